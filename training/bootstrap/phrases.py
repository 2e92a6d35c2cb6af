"""Offline noun-phrase chunker (for OWLv2, which needs explicit text queries).

No model download: captions are split into word runs that contain no stopword and no
punctuation, and each run is cut down to its last ``max_words`` words (English noun phrases end
in their head noun: "bright red vintage scooter"). Every phrase keeps its character span in the
caption, so `caption[start:end] == phrase`.

Known misses (no part-of-speech tagger):
- verbs not in the stopword list join the neighbouring nouns ("man fixes bike" is one phrase);
  common caption verbs, "-ing", "-ly" and long "-ed" words are treated as boundaries, which also splits the
  rare noun-phrase that contains one ("running shoes" -> "shoes") unless it is on the allowlist;
- adjectives stay in the phrase ("red scooter"), which is what OWLv2 queries want anyway;
- pronouns and numerals are never phrases ("two dogs" -> "dogs");
- non-English captions are chunked by the same rules and mostly come out as long runs.
Grounding DINO does not need this: it grounds the caption itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*", re.UNICODE)

STOPWORDS = frozenset("""
a an the this that these those some any each every all both either neither no another other such
my your his her its our their mine yours hers ours theirs
i me you he him she it we us they them one ones someone something anyone anything everyone everything
and or but nor so yet if then than as because while when where whereas though although
of in on at to from by with without within into onto upon over under above below between among
around through across along against behind beyond near beside besides toward towards inside outside
about after before during until up down off out via per like unlike next front top bottom side
is are was were be been being am do does did has have had having can could will would shall should
may might must not very too also just only even still really quite rather almost
there here what which who whom whose how why
zero two three four five six seven eight nine ten eleven twelve many few several lots lot
holds hold holding wears wear wearing sits sit sitting stands stand standing runs run running walks
walk walking rides ride riding looks look looking plays play playing shows show showing eats eat
eating lies lie lying flies fly flying jumps jump jumping smiles smile smiling poses pose posing
made make makes taken take takes seen see sees set sets get gets got gives give given features
featuring depicts depicting photo picture image photograph illustration rendering render style
background foreground view closeup close-up shot scene day night daytime evening morning
""".split())

# "-ing"/"-ly" words that are usually nouns in captions (not boundaries)
ING_NOUNS = frozenset("""building buildings painting paintings clothing ceiling wedding ring rings thing things
king string evening morning pudding railing stuffing frosting icing swing swings sibling siblings
duckling ping wing wings earring earrings lily family belly jelly bully""".split())

PUNCT_BREAK = re.compile(r"[^\s]")  # anything but whitespace between two words ends a phrase


@dataclass(frozen=True)
class Phrase:
    text: str
    start: int
    end: int


def _is_break(word: str) -> bool:
    w = word.lower().replace("\u2019", "'")
    if w in STOPWORDS or w.isdigit():
        return True
    if w in ING_NOUNS:
        return False
    return (len(w) > 4 and (w.endswith("ing") or w.endswith("ly"))) or (len(w) > 5 and w.endswith("ed"))


def extract_phrases(caption: str, max_words: int = 3, max_phrases: int = 16, dedupe: bool = True) -> list[Phrase]:
    """Candidate noun phrases of `caption`, in order, with character spans (deduplicated by text)."""
    phrases: list[Phrase] = []
    run: list[re.Match] = []

    def flush() -> None:
        if run:
            words = run[-max_words:]
            s, e = words[0].start(), words[-1].end()
            phrases.append(Phrase(caption[s:e], s, e))
        run.clear()

    prev_end = 0
    for m in WORD.finditer(caption):
        if run and PUNCT_BREAK.search(caption[prev_end : m.start()]):
            flush()
        if _is_break(m.group(0)):
            flush()
        else:
            run.append(m)
        prev_end = m.end()
    flush()
    if not dedupe:
        return phrases
    seen, out = set(), []
    for p in phrases:
        key = p.text.lower()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out[:max_phrases]


def trim_span(caption: str, start: int, end: int) -> tuple[int, int] | None:
    """Widen [start, end) to whole words, then drop leading/trailing stopwords; None if nothing is left."""
    words = [m for m in WORD.finditer(caption) if m.end() > start and m.start() < end]
    while words and _is_stop(words[0].group(0)):
        words.pop(0)
    while words and _is_stop(words[-1].group(0)):
        words.pop()
    if not words:
        return None
    return words[0].start(), words[-1].end()


def _is_stop(word: str) -> bool:
    w = word.lower().replace("\u2019", "'")
    return w in STOPWORDS or w.isdigit()


PERSON_WORDS = frozenset("""person people man men woman women boy boys girl girls child children kid kids baby babies
toddler teenager teen lady ladies guy guys gentleman gentlemen adult adults player players athlete
athletes worker workers soldier soldiers doctor nurse chef bride groom mother father mom dad son
daughter sister brother grandmother grandfather grandma grandpa wife husband friend friends couple
student students actor actress singer dancer model models portrait face selfie human humans figure
businessman businesswoman policeman policewoman firefighter astronaut knight warrior princess prince
queen king witch wizard""".split())


def is_person_phrase(phrase: str) -> bool:
    """True when the phrase's head noun (its last word) names a person."""
    words = WORD.findall(phrase.lower())
    return bool(words) and words[-1] in PERSON_WORDS
