"""Every example workflow loads in ComfyUI: node types exist, links type-check, widgets fit.

CI has no ComfyUI, so the definitions of the stock nodes the workflows use are embedded below,
copied from ComfyUI 0.3.64's source (nodes.py, comfy_extras/nodes_mask.py, comfy/samplers.py at
a125cd84) and checked against that version's /object_info. Our nodes' definitions come from the
pack itself (imported against tests/comfy_doubles.py). `ui_to_api` is the frontend's graphToPrompt
for these simple graphs; the real-ComfyUI check in README.md posted its output to /prompt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comfy_doubles import REPO_ROOT, comfy_env  # noqa: F401  (fixture)

WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
DOC = REPO_ROOT / "README.md"
SAMPLE_IMAGES = REPO_ROOT / "mumu_core" / "assets"

_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
               "linear_quadratic", "kl_optimal"]
_MAX_RES = 16384
# Combo lists filled from the user's folders at run time: the value is checked elsewhere
# (model table / sample images) instead of against a list.
FILES = "<files>"

# name -> (inputs [(name, type, opts)] in INPUT_TYPES order, outputs [type]); ComfyUI 0.3.64.
STOCK_NODES = {
    "CheckpointLoaderSimple": ([("ckpt_name", FILES, {"folder": "checkpoints"})], ["MODEL", "CLIP", "VAE"]),
    "LoadImage": ([("image", FILES, {"image_upload": True, "folder": "input"})], ["IMAGE", "MASK"]),
    "InvertMask": ([("mask", "MASK", {})], ["MASK"]),
    "EmptyLatentImage": ([
        ("width", "INT", {"default": 512, "min": 16, "max": _MAX_RES, "step": 8}),
        ("height", "INT", {"default": 512, "min": 16, "max": _MAX_RES, "step": 8}),
        ("batch_size", "INT", {"default": 1, "min": 1, "max": 4096}),
    ], ["LATENT"]),
    "KSampler": ([
        ("model", "MODEL", {}),
        ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        ("steps", "INT", {"default": 20, "min": 1, "max": 10000}),
        ("cfg", "FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        ("sampler_name", _SAMPLERS, {}),
        ("scheduler", _SCHEDULERS, {}),
        ("positive", "CONDITIONING", {}),
        ("negative", "CONDITIONING", {}),
        ("latent_image", "LATENT", {}),
        ("denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
    ], ["LATENT"]),
    "VAEDecode": ([("samples", "LATENT", {}), ("vae", "VAE", {})], ["IMAGE"]),
    "SaveImage": ([("images", "IMAGE", {}), ("filename_prefix", "STRING", {"default": "ComfyUI"})], []),
}
# Frontend-only nodes: never sent to the server (graphToPrompt skips them).
FRONTEND_ONLY = {"Note": ["STRING"], "MarkdownNote": ["STRING"]}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def _is_widget(typ, opts) -> bool:
    return (isinstance(typ, list) or typ == FILES or typ in WIDGET_TYPES) and not opts.get("forceInput")


def pack_definitions(nodes_module) -> dict:
    defs = {}
    for name, cls in nodes_module.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        inputs = []
        for section in ("required", "optional"):
            for inp, entry in spec.get(section, {}).items():
                typ, opts = entry[0], dict(entry[1]) if len(entry) > 1 else {}
                opts["optional"] = section == "optional"
                # Model dropdowns are listings of the user's folders: check names against the docs.
                if isinstance(typ, list) and inp in {"vlm_folder", "bundle", "lora", "lora_name", "ckpt_name"}:
                    typ = FILES
                inputs.append((inp, typ, opts))
        defs[name] = (inputs, list(cls.RETURN_TYPES))
    return defs


@pytest.fixture
def definitions(comfy_env):
    defs = dict(STOCK_NODES)
    defs.update(pack_definitions(comfy_env.import_pack()))
    return defs


def widget_slots(inputs) -> list[tuple[str, object, dict]]:
    """The widgets_values layout: one entry per widget, plus the frontend's extra entries."""
    slots = []
    for name, typ, opts in inputs:
        if not _is_widget(typ, opts):
            continue
        slots.append((name, typ, opts))
        if opts.get("control_after_generate"):
            slots.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"], {}))
        if opts.get("image_upload"):
            slots.append(("upload", ["image"], {}))
    return slots


def ui_to_api(workflow: dict, defs: dict) -> dict:
    """UI-format workflow -> /prompt API format (what the frontend's graphToPrompt sends)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        inputs, _ = defs[node["type"]]
        api_inputs = {}
        values = list(node.get("widgets_values", []))
        for (name, _typ, _opts), value in zip(widget_slots(inputs), values):
            if name not in ("control_after_generate", "upload"):
                api_inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                api_inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": api_inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_is_a_workflow_per_paper_task():
    stems = {p.stem for p in WORKFLOWS}
    assert {"mumu_composition", "mumu_harmonisation", "mumu_style_transfer", "mumu_character_consistency",
            "mumu_community_finetune"} <= stems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_ui_format_without_subgraphs_with_a_thumbnail(path):
    wf = _load(path)
    assert wf["version"] == 0.4
    assert not wf.get("definitions", {}).get("subgraphs")
    assert {"last_node_id", "last_link_id", "nodes", "links"} <= set(wf)
    assert wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)
    assert len({n["id"] for n in wf["nodes"]}) == len(wf["nodes"])
    thumbs = [path.with_suffix(ext) for ext in (".png", ".jpg", ".webp")]
    assert any(t.is_file() and t.stat().st_size > 1000 for t in thumbs), f"{path.stem} has no thumbnail"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_type_exists_and_links_type_check(path, definitions):
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert node["type"] in definitions or node["type"] in FRONTEND_ONLY, f"unknown node type {node['type']}"
    for link in wf["links"]:
        link_id, src, src_slot, dst, dst_slot, typ = link
        src_node, dst_node = nodes[src], nodes[dst]
        _, outputs = definitions[src_node["type"]]
        assert outputs[src_slot] == typ, f"link {link_id}: {src_node['type']} output {src_slot} is {outputs[src_slot]}"
        assert src_node["outputs"][src_slot]["type"] == typ
        assert link_id in (src_node["outputs"][src_slot]["links"] or [])
        dst_input = dst_node["inputs"][dst_slot]
        assert dst_input["link"] == link_id
        declared = {name: t for name, t, _ in definitions[dst_node["type"]][0]}
        assert dst_input["name"] in declared, f"{dst_node['type']} has no input {dst_input['name']}"
        # ComfyUI accepts a link when the types overlap (comma-separated unions such as "IMAGE,MUMU_IMAGE",
        # comfy_execution/validation.py validate_node_input); the saved input keeps the declared type.
        assert declared[dst_input["name"]] == dst_input["type"], f"link {link_id}: saved input type differs"
        assert typ in declared[dst_input["name"]].split(","), f"link {link_id} type mismatch"
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs, outputs = definitions[node["type"]]
        assert [o["type"] for o in node.get("outputs", [])] == outputs, node["type"]
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, typ, opts in inputs:
            if not _is_widget(typ, opts) and not opts.get("optional"):
                assert name in linked, f"{node['type']} #{node['id']}: required input {name} is not connected"


def _fits(name, typ, opts, value) -> str | None:
    if isinstance(typ, list):
        return None if value in typ else f"{name}={value!r} not in {typ[:8]}..."
    if typ == FILES:
        return None if isinstance(value, str) and value else f"{name} is empty"
    if typ == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{name}={value!r} is not an int"
    if typ == "FLOAT" and not isinstance(value, (int, float)):
        return f"{name}={value!r} is not a number"
    if typ == "STRING" and not isinstance(value, str):
        return f"{name}={value!r} is not a string"
    if typ == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}={value!r} is not a bool"
    if "min" in opts and value < opts["min"]:
        return f"{name}={value} < min {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{name}={value} > max {opts['max']}"
    return None


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_fit_their_inputs(path, definitions):
    for node in _load(path)["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            assert all(isinstance(v, str) for v in node["widgets_values"])
            continue
        slots = widget_slots(definitions[node["type"]][0])
        values = node.get("widgets_values", [])
        assert len(values) == len(slots), f"{node['type']} #{node['id']}: {len(values)} widget values for {len(slots)} widgets"
        problems = [p for (n, t, o), v in zip(slots, values) if (p := _fits(n, t, o, v))]
        assert not problems, f"{node['type']} #{node['id']}: {problems}"


def _model_table() -> str:
    return DOC.read_text() if DOC.exists() else ""


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_model_files_match_the_readme_table_and_models_entries(path, definitions):
    wf = _load(path)
    table = _model_table()
    used = {}
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        for (name, typ, opts), value in zip(widget_slots(definitions[node["type"]][0]), node["widgets_values"]):
            if typ == FILES:
                used[(node["type"], name)] = value
    for (node_type, name), value in used.items():
        if node_type == "LoadImage":
            assert (SAMPLE_IMAGES / value).is_file(), f"LoadImage {value} is not one of the sample images"
        else:
            if node_type == "MumuApplyUnetLora":  # "mumu/<bundle>" or "loras/<file>": the folder, then the file
                value = value.split("/", 1)[1]
            assert f"`{value}`" in table, f"{node_type}.{name}={value} is missing from the model table in {DOC.name}"
    entries = wf.get("models", [])
    for entry in entries:
        assert set(entry) >= {"name", "url", "directory"}
        assert entry["url"].startswith("https://") and entry["url"].split("?")[0].endswith(entry["name"])
        assert entry["name"] in used.values(), f"models entry {entry['name']} is not used by the workflow"
    checkpoints = [v for (t, n), v in used.items() if n == "ckpt_name"]
    assert all(c in {e["name"] for e in entries} for c in checkpoints), "checkpoints need a models entry"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_api_conversion_gives_every_required_input(path, definitions):
    prompt = ui_to_api(_load(path), definitions)
    assert any(n["class_type"] == "SaveImage" for n in prompt.values())
    for node_id, node in prompt.items():
        inputs, _ = definitions[node["class_type"]]
        for name, typ, opts in inputs:
            if not opts.get("optional"):
                assert name in node["inputs"], f"{node['class_type']} #{node_id} lacks {name}"
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt, f"{node['class_type']} #{node_id} links to a missing node"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_prompt_text_matches_connected_images(path, definitions, comfy_env):
    """The MUMU prompt of each example is valid for the images it connects (no error on Queue)."""
    wf = _load(path)
    for node in wf["nodes"]:
        if node["type"] not in ("MumuInterleavedPrompt", "MumuPrompt"):
            continue
        text = node["widgets_values"][0]
        connected = sorted(int(m.group(1)) for i in node["inputs"] if i.get("link") is not None
                           if (m := re.fullmatch(r"image_(\d+)", i["name"])))
        from mumu_core.prompt import InterleavedPrompt

        if text.strip():
            assert connected == list(range(1, len(connected) + 1))
            InterleavedPrompt.parse(text, [object()] * len(connected))  # raises on a mismatch
        else:
            assert not connected



# --------------------------------------------------------------------------- what a first look shows
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_uses_the_new_prompt_node_and_the_batched_negative(path):
    wf = _load(path)
    types = {n["type"] for n in wf["nodes"]}
    assert "MumuPrompt" in types and not types & {"MumuInterleavedPrompt", "MumuEncodeUnconditional"}
    nodes = {n["id"]: n for n in wf["nodes"]}
    (ks,) = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    sources = {}
    for link_id, src, src_slot, dst, dst_slot, _ in wf["links"]:
        if dst == ks["id"]:
            sources[ks["inputs"][dst_slot]["name"]] = (nodes[src]["type"], nodes[src]["outputs"][src_slot]["name"])
    assert sources["positive"] == ("MumuEncode", "positive")
    assert sources["negative"] == ("MumuEncode", "negative")
    prompt = next(n for n in wf["nodes"] if n["type"] == "MumuPrompt")
    expected = "1296" if "character" in path.stem else "auto"  # Fig. 10 uses the stage-2 budget
    assert prompt["widgets_values"][1] == expected


VIEW = (1280, 720)  # a small laptop's canvas: the saved view must explain the workflow there


def _rect(node):
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - 30, x + w, y + h  # litegraph draws the 30 px title bar above pos


def _slot_y(node, index):
    return node["pos"][1] + 14 + 20 * index


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_about_note_is_on_screen_in_the_saved_view(path):
    wf = _load(path)
    ds = wf["extra"]["ds"]
    note = next(n for n in wf["nodes"] if n["type"] in FRONTEND_ONLY)
    x0, y0, x1, y1 = _rect(note)
    scale, (ox, oy) = ds["scale"], ds["offset"]
    sx0, sy0, sx1, sy1 = (x0 + ox) * scale, (y0 + oy) * scale, (x1 + ox) * scale, (y1 + oy) * scale
    assert 0 <= sx0 and 0 <= sy0 and sx1 <= VIEW[0] and sy1 <= VIEW[1], (sx0, sy0, sx1, sy1)
    assert scale >= 0.6  # ComfyUI's frontend (1.27) draws nodes without text below 0.6


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_link_runs_behind_a_node(path):
    """Sample each link along litegraph's spline (control points a quarter of the distance out)."""
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, _ in wf["links"]:
        a, b = nodes[src], nodes[dst]
        p0 = (a["pos"][0] + a["size"][0], _slot_y(a, src_slot))
        p3 = (b["pos"][0], _slot_y(b, dst_slot))
        d = ((p3[0] - p0[0]) ** 2 + (p3[1] - p0[1]) ** 2) ** 0.5 * 0.25
        p1, p2 = (p0[0] + d, p0[1]), (p3[0] - d, p3[1])
        for i in range(1, 100):
            t = i / 100
            x = (1 - t) ** 3 * p0[0] + 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t ** 2 * p2[0] + t ** 3 * p3[0]
            y = (1 - t) ** 3 * p0[1] + 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t ** 2 * p2[1] + t ** 3 * p3[1]
            for other in wf["nodes"]:
                x0, y0, x1, y1 = _rect(other)
                if other["id"] in (src, dst) and (abs(x - p0[0]) < 12 or abs(x - p3[0]) < 12):
                    continue
                assert not (x0 < x < x1 and y0 < y < y1), (
                    f"link {link_id} ({a['type']} -> {b['type']}) runs behind {other['type']} #{other['id']} at {x:.0f},{y:.0f}")
