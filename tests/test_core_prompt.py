import numpy as np
import pytest
from PIL import Image

from mumu_core.errors import PromptError
from mumu_core.prompt import InterleavedPrompt, PromptImage, check_tokens_per_image


def imgs(n):
    return [PromptImage(Image.new("RGB", (8, 8), (i * 40, 0, 0))) for i in range(n)]


def test_bare_placeholders_bind_in_order():
    p = InterleavedPrompt.parse("a <image> man and his <image> dog in an <image> animated style", imgs(3))
    assert p.segments == ["a ", 0, " man and his ", 1, " dog in an ", 2, " animated style"]
    assert p.image_order == [0, 1, 2]


def test_explicit_index_can_repeat_an_image():
    p = InterleavedPrompt.parse("<image:2> and <image> then <image:2> again <image>", imgs(2))
    assert p.image_order == [1, 0, 1, 1]


def test_more_placeholders_than_images_names_both_counts():
    with pytest.raises(PromptError) as e:
        InterleavedPrompt.parse("a <image> man and his <image> dog", imgs(1))
    msg = str(e.value)
    assert "2 <image> placeholder" in msg and "1 image(s)" in msg and "connect 1 more" in msg


def test_unused_images_are_an_error():
    with pytest.raises(PromptError, match=r"image\(s\) 2, 3 are connected but the prompt never uses them"):
        InterleavedPrompt.parse("a <image> man", imgs(3))


def test_index_out_of_range():
    with pytest.raises(PromptError, match=r"<image:3> refers to image 3, but the prompt has images 1..2"):
        InterleavedPrompt.parse("<image> <image> <image:3>", imgs(2))
    with pytest.raises(PromptError, match="Image numbers start at 1"):
        InterleavedPrompt.parse("<image:0> x", imgs(1))


def test_no_text_with_images():
    with pytest.raises(PromptError, match="no text but 2 image"):
        InterleavedPrompt.parse("   ", imgs(2))


def test_empty_prompt_without_images_is_unconditional():
    p = InterleavedPrompt.parse("")
    assert p.is_empty and p.images == []


@pytest.mark.parametrize("typo", ["<image 2>", "<img>", "<Image>", "<image:x>"])
def test_malformed_placeholders_are_reported(typo):
    with pytest.raises(PromptError, match="not a valid placeholder"):
        InterleavedPrompt.parse(f"a {typo} man <image>", imgs(1))


def test_tokens_per_image_must_be_square_and_error_names_neighbours():
    assert check_tokens_per_image(324) == 324
    with pytest.raises(PromptError) as e:
        check_tokens_per_image(300)
    assert "289 (17x17)" in str(e.value) and "324 (18x18)" in str(e.value)
    with pytest.raises(PromptError):
        PromptImage(Image.new("RGB", (4, 4)), tokens_per_image=1000)
    with pytest.raises(PromptError):
        check_tokens_per_image(0)


def test_weight_must_be_a_finite_number():
    with pytest.raises(PromptError):
        PromptImage(np.zeros((4, 4, 3)), weight="strong")
    with pytest.raises(PromptError):
        PromptImage(np.zeros((4, 4, 3)), weight=float("inf"))


def test_expand_replaces_each_placeholder():
    p = InterleavedPrompt.parse("a <image> b <image:1>", [PromptImage(None, tokens_per_image=4)])
    assert p.expand(lambda im: "[" + "i" * im.tokens_per_image + "]") == "a [iiii] b [iiii]"


# --------------------------------------------------------------------------- prompt errors
def test_weight_in_the_text_like_comfy_word_weights():
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    images = [PromptImage("a", weight=2.0), PromptImage("b")]
    p = InterleavedPrompt.parse("a (<image>:0.5) man and his ( <image:2> : 1.25 ) dog", images)
    assert [im.weight for im in p.images] == [1.0, 1.25]  # multiplies the image's own weight
    assert images[0].weight == 2.0  # the caller's objects are not changed
    assert p.segments == ["a ", 0, " man and his ", 1, " dog"]


def test_conflicting_weights_for_one_image_are_an_error():
    from mumu_core.errors import PromptError
    from mumu_core.prompt import InterleavedPrompt

    with pytest.raises(PromptError, match="different weights"):
        InterleavedPrompt.parse("(<image>:0.5) and (<image:1>:2)", ["a"])


def test_weight_that_is_not_a_number_is_reported():
    from mumu_core.errors import PromptError
    from mumu_core.prompt import InterleavedPrompt

    with pytest.raises(PromptError, match=r"\(<image>:0.8\)"):
        InterleavedPrompt.parse("a (<image>:strong) man", ["a"])


def test_unclosed_placeholder_gets_a_hint_not_only_unused_image():
    from mumu_core.errors import PromptError
    from mumu_core.prompt import InterleavedPrompt

    with pytest.raises(PromptError) as err:
        InterleavedPrompt.parse("a <image cat", ["a"])
    msg = str(err.value)
    assert "never closed" in msg and "'<image> cat'" in msg and "never uses" not in msg


def test_auto_token_budget_is_filled_from_the_default():
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    p = InterleavedPrompt.parse("a <image> and <image>", [PromptImage("a", tokens_per_image="auto"),
                                                          PromptImage("b", tokens_per_image=64)])
    assert [im.tokens_per_image for im in p.images] == [None, 64]
    assert [im.tokens_per_image for im in p.with_default_tokens(1296).images] == [1296, 64]


def test_prompt_longer_than_the_vlm_context_is_refused_before_compute(tiny_encoder):
    from mumu_core.errors import PromptError
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    vlm = tiny_encoder.vlm
    budget = vlm.max_tokens_per_image
    n = vlm.max_context_tokens // budget + 1
    images = [PromptImage(object(), tokens_per_image=budget) for _ in range(n)]
    prompt = InterleavedPrompt.parse(" ".join("<image>" for _ in range(n)), images)
    with pytest.raises(PromptError) as err:
        tiny_encoder.vlm.tokenize([prompt])  # tokenizing only: no image is even prepared
    msg = str(err.value)
    assert f"at most {vlm.max_context_tokens} tokens" in msg and "fewer images" in msg


def test_weight_zero_images_are_left_out_with_their_placeholders():
    a, b, c = (PromptImage(object(), weight=w) for w in (1.0, 0.0, 2.0))
    p = InterleavedPrompt.parse("a <image> man, his <image> dog and <image:2> cat in a <image> style", [a, b, c])
    kept, numbers = p.without_silenced_images()
    assert numbers == [0, 2]
    assert kept.images == [a, c] and kept.segments == ["a ", 0, " man, his dog and cat in a ", 1, " style"]
    assert kept.text == "a <image:1> man, his dog and cat in a <image:2> style"
    assert InterleavedPrompt.parse(kept.text, [a, c]).segments == kept.segments  # still a valid prompt

    first = InterleavedPrompt.parse("<image> ball on the floor", [PromptImage(object(), weight=0)])
    assert first.without_silenced_images()[0].segments == ["ball on the floor"]
    plain = InterleavedPrompt.parse("a <image> ball", [a])
    assert plain.without_silenced_images() == (plain, [0])  # nothing silenced: the same prompt
