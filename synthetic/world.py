"""Synthetic visual world: a small, learnable stand-in for E-VQA, E-IC and VLKEB.

Run ``python -m synthetic.world --seed 0 --out data/synthetic`` (see ``--help`` for the size
flags), or call :func:`ensure_world` from code.

The world
---------
An *entity* is a picture of ONE large solid shape, described by four attributes:

* ``shape``      one of :data:`SHAPES` (8 shapes),
* ``color``      the colour of the shape, one of :data:`COLORS` (11 colours),
* ``background`` the background colour, also one of :data:`COLORS` (never the shape colour, and
                 only pairs with enough contrast, see :data:`MIN_CONTRAST`),
* ``frame``      the colour of a thick border around the whole picture (:func:`frame_width`,
                 6 px at 64 px), one of :data:`COLORS`: never the shape or background colour,
                 and contrasting with the background like the shape.

Format 6 also had 1-3 copies and stripes; at 32 px they made the shape's colour hard to read, so
every entity is now one solid shape, as large as fits inside the frame (:data:`SHAPE_RADIUS`:
0.34 of the inner side, 14-37% of the inner area at 32 px depending on the shape).

The *colour signature* of an entity is ``(color, background, frame)``: 746 valid signatures.
The tiny backbones (32x32 input) reliably perceive only the colours of large regions, so the
signature is all that tells two images apart for them (and for an editor's visual filter).
Each signature gets ``WorldConfig.entities_per_signature`` (default and at most 8 = one per
shape) entities with distinct shapes drawn from the seed: 5,968 entities by default
(:func:`all_entities`).

Every entity has any number of *renders*: render ``k`` of entity ``e`` is a deterministic
function of ``(seed, e, k)`` (position, scale, small rotation, colour shift and pixel noise
vary; the frame is painted over everything, so it is always fully visible).
Renders ``k = 0`` and ``k = 1`` are reserved for the datasets (``image`` / ``m_loc`` and
``image_rephrase``); renders ``k >= 2`` are pretraining renders.

Never-edited signatures. An m_loc image must be unrelated to every edit, and a tiny backbone
only sees colours: an m_loc image with the colours of an edited image looks like that image,
and the editor fires on it (with only (shape colour, background) pairs, 96 of them, an m_loc
image shared its pair with one of 100 edits ~64% of the time). Real datasets never have this:
their m_loc images come from other sources and every real image is distinct. So about 12% of
the signatures (:data:`LOC_SIGNATURE_FRACTION`, 90 of 746, chosen from the seed) are reserved:
the m_loc pool takes its entities from them, and no train or eval edit entity of any dataset
has one. Reserved entities are still pretrained (the backbone must know the m_loc answers).
Edit entities are dealt round-robin over the other signatures, so consecutive records (the
edits of one chunk) have different colour signatures.

Near-miss m_loc images in the train split (format 8). Measured with a trained editor, its visual
filter fires on 12-26% of the m_loc images that share 2 of the 3 colours with an edited image and
almost never on those sharing 0-1; random batches seldom hold such pairs, so training rarely asks
for the difference. Each TRAIN record's m_loc entity is therefore drawn (from the seed) among the
m_loc pool entities whose signature shares exactly 2 of its edit entity's 3 colours (93% of the
train records by default; the others, whose signature has no reserved near miss, keep a random
pool entity), so an editor learns to tell an edited image from one that shares two of its three
colours. The m_loc question and answer are as before (a VQA / VLKEB question about the m_loc
image and its true answer). Eval m_loc images are still random from the reserved pool, so the
benchmark itself is unchanged (eval files are byte-identical to format 7). So is the pretraining
corpus: the random draw of format 7 is still made and its render still written (it stays a
held-out render of ``pretrain/heldout.json``), the near miss replaces it only in the record.

Knowledge on top of perception (VLKEB style): every (shape, colour) pair is the emblem of a
made-up *city* (88 names) and every background colour is the flag of a made-up *country*
(11 names); both lookups are drawn from the seed.

Text-only facts (text locality) are small compositional families: next day/month/letter, the
successor of a number, small additions, opposites, animal sounds, plurals, polygon sides, colour
mixing (230 facts). Each family has three paraphrase templates.

Questions. SYNTH-EVQA and the pretraining VQA examples ask only about the three colours of the
image (:data:`VQA_TYPES`: the shape's colour, the background colour and the frame colour), which
a tiny model learns from pixels within its pretraining budget; the shape still varies, still
appears in captions and still picks the VLKEB city, so every entity keeps its visual identity.

Held-out paraphrases rotate over items. Every template of every list (VQA questions, caption
prompts, VLKEB questions, text-fact templates) is pretrained, but each item holds one out: entity
``e`` never sees template :func:`heldout_template` ``(e.idx, n)`` of a list of ``n`` (a rotation
on the entity index, skewed so it does not follow blocks of consecutive entities), and text fact
``i`` never sees template ``i % 3`` of its family (with or without the ``"nq question: "``
prefix). Each template is therefore learnt with other items, and the held-out paraphrase
examples of ``pretrain/heldout.json`` are exactly the unseen (item, template) pairs. Dataset
records may use any template (``src != rephrase``); ``loc`` uses a trained template of its fact.

Edit targets (``alt``) are wrong answers that the pretrained model does not already predict:
SYNTH-EVQA uses a colour that is none of the image's three colours, SYNTH-VLKEB another city or
country; SYNTH-EIC (``pred`` = the true caption, e.g. "a red star on a blue background with a
green frame") uses a wrong description in a phrasing that pretraining never uses,
``"sketch of the {shape} in {colour}"`` with a wrong shape and a colour absent from the image
(e.g. "sketch of the cross in yellow"). True captions start with "a" / "an" and share most of
their tokens ("on a ... background with a ... frame"), so a caption of another entity would
score high teacher-forced accuracy before any edit; the quality bar is <= 25%.

Files written under ``<out>``
-----------------------------
::

    world.json                                   manifest (seed, config, vocabulary, counts), written last
    entities.json                                every entity: id, attributes, city, country, split, reserved
    easy-edit-mm/vqa/vqa_train.json, vqa_eval.json                  SYNTH-EVQA (real E-VQA schema)
    easy-edit-mm/caption/caption_train_edit.json, caption_eval_edit.json   SYNTH-EIC
    easy-edit-mm/images/{train,eval,rephrase,loc}/<eid>_<k>.png     images of both (shared)
    VLKEB/train.json, VLKEB/eval.json                               SYNTH-VLKEB
    VLKEB/mmkb_images/<eid>/render_<k>.png                          its images
    pretrain/train.json                          pretraining corpus (true answers only)
    pretrain/heldout.json                        held-out renders / paraphrases, for accuracy
    pretrain/images/<eid>_<k>.png                pretraining renders (k >= 2)
    general/vqa_general.json                     general-capability VQA set (VQAv2-style, format 10)
    general/images/<eid>_<k>.png                 its images (render k = GENERAL_RENDER, never pretrained)

Portability (format 10). Every SYNTH-VLKEB record also carries ``port_new``, as VLKEB's one-hop
file does: one question about the edit image whose answer follows from the edited fact and a true
fact of the world. A city edit ("the city in this image is X") is followed by "What color / shape is
the emblem of the city in the image?": the answer is X's emblem colour (or its shape, when that
colour is one of the image's own colours), which the backbone learnt only as "a picture of a <colour>
<shape> shows X". A country edit ("the country is Y") is followed by "What color is the flag of the
country in the image?": Y's flag colour (never the image's background, whose country is the true
one). So the answer is never what the unedited picture shows (except for a few country records
whose new flag colour is the shape's or the frame's colour), and it is reachable only through the
edit. ``port_edit_q`` / ``port_edit_a`` state the hop ("What color is the emblem of X?"). The
draws use their own random stream: every other field, and the pretraining corpus, are as in format 9.

General capability (format 10). ``general/vqa_general.json`` holds ``WorldConfig.n_general``
ordinary VQA questions (a trained template of the shape / background / frame colour) about a fresh
render (k = :data:`GENERAL_RENDER`, never pretrained and never a dataset image) of entities with
reserved colour signatures, which no edit of any dataset touches; the layout is the VQAv2-style one
``test_vllm_edit.py --general`` reads (``question``, ``image`` relative to the file, ``answers``).

Dataset records have exactly the keys of the real data (:data:`RECORD_KEYS`, plus ``port_new`` in
SYNTH-VLKEB); image paths are
relative to the dataset's image root (``easy-edit-mm/images`` or ``VLKEB/mmkb_images``).
Train and eval use disjoint entity sets, and ``m_loc`` images come from a third pool of
entities that is never edited and whose colour signatures no edited entity has
(``entities.json`` marks them ``"reserved"``; ``world.json`` lists them).

Pretraining corpus format: a JSON list of ``{"image": <path relative to <out>> | null,
"prompt": str, "target": str, "kind": "vqa" | "caption" | "vlkeb" | "text"}``; heldout entries
also carry ``"heldout"``: ``"render"`` (a dataset render, never pretrained, asked with templates
its entity trains on), ``"paraphrase"`` (a pretraining render or a text fact, asked with the
template its item holds out) or ``"render+paraphrase"`` (both). Prompts are already in
the evaluation's task format (``"{question} The answer is:"`` for VQA, ``"{loc}?"`` for text,
``src`` as is for captions / VLKEB); targets have no leading space (add one when the prompt does
not end in whitespace). Text facts are < 1% of ``train.json``: oversample ``kind == "text"``.

Default sizes (seed 0): 2,000 train / 1,000 eval records per dataset, an m_loc pool of 500
entities (of the 720 with reserved signatures), 2 pretraining renders for each of the 5,968
entities: 132k pretraining examples (19 MB), 12k held-out examples, 24,936 PNG files (64x64
RGB, 18,436 distinct renders; 108 MB in all); ~17 s on 2 cores. Each dataset's train and eval
records use one distinct entity per record. For extra image augmentation while pretraining, :func:`render_entity` with
``2 + pretrain_renders <= k < 1000`` gives fresh renders that are never dataset images (k = 1000 is the
general set's, k >= 2000 the large eval split's).

The large eval split (SYNTH-EVQA ``eval_large``, 10,000 records by default) is not part of the world:
``--large_eval N`` (or its first use) adds it to a complete world without changing any file of it; see
:mod:`synthetic.large_eval`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from utils.io import atomic_dir, remove_temporaries
from utils.locks import build_lock, build_once

try:  # tqdm is optional: progress output only
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

FORMAT_VERSION = 10  # bump whenever the generated content changes: stale worlds are regenerated
MANIFEST = "world.json"

RECORD_KEYS = (
    "src", "rephrase", "pred", "alt", "image", "image_rephrase",
    "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a",
)

# Dataset files, relative to <out>: name -> (json path, image root).
DATASET_FILES = {
    "evqa_train": ("easy-edit-mm/vqa/vqa_train.json", "easy-edit-mm/images"),
    "evqa_eval": ("easy-edit-mm/vqa/vqa_eval.json", "easy-edit-mm/images"),
    "evqa_val": ("easy-edit-mm/vqa/vqa_val.json", "easy-edit-mm/images"),
    "eic_train": ("easy-edit-mm/caption/caption_train_edit.json", "easy-edit-mm/images"),
    "eic_eval": ("easy-edit-mm/caption/caption_eval_edit.json", "easy-edit-mm/images"),
    "eic_val": ("easy-edit-mm/caption/caption_val_edit.json", "easy-edit-mm/images"),
    "vlkeb_train": ("VLKEB/train.json", "VLKEB/mmkb_images"),
    "vlkeb_eval": ("VLKEB/eval.json", "VLKEB/mmkb_images"),
    "vlkeb_val": ("VLKEB/val.json", "VLKEB/mmkb_images"),
}
PRETRAIN_FILES = {"train": "pretrain/train.json", "heldout": "pretrain/heldout.json"}
GENERAL_FILE = "general/vqa_general.json"
GENERAL_RENDER = 1000  # render index of the general set's images: never pretrained, never a dataset's

VQA_SUFFIX = " The answer is:"
NQ_PREFIX = "nq question: "

# ----------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "crescent")
# Few, well separated colours (distinguishable after resizing to 32x32 with jitter and noise).
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 10),
    "yellow": (245, 225, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (140, 55, 190),
    "pink": (245, 160, 200),
    "brown": (120, 70, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
MIN_CONTRAST = 110.0  # minimal RGB distance of shape colour and of frame colour to the background

# Fraction of colour signatures whose entities form the m_loc pool and are never edited.
LOC_SIGNATURE_FRACTION = 0.12

# VQA questions ask only about the three colours of the image (shape, background, frame):
# the shape stays in captions and in the VLKEB city lookup.
VQA_TYPES = ("color", "background", "frame")
# Paraphrase lists: every template is pretrained; each entity holds out one template of each list
# (see :func:`heldout_template`), used only in pretrain/heldout.json.
VQA_QUESTIONS = {
    "color": (
        "What color is the shape?",
        "What is the color of the shape?",
        "Which color does the object have?",
        "What colour are the objects in the picture?",
        "Tell me the color of the figure.",
    ),
    "background": (
        "What color is the background?",
        "What is the background color?",
        "Which color is behind the shape?",
        "What colour is the backdrop of the image?",
        "Tell me the color of the background.",
    ),
    "frame": (
        "What color is the frame?",
        "What is the color of the border?",
        "Which color is the edge of the picture?",
        "What colour is the border around the image?",
        "Tell me the color of the frame.",
    ),
}
CAPTION_SRC = "a photo of"
CAPTION_PROMPTS = (
    "a photo of",
    "a picture of",
    "an image of",
    "describe the image content,",
    "provide a brief overview of the image content,",
    "offer a rich description of the image,",
)
VLKEB_TYPES = ("city", "country")
VLKEB_QUESTIONS = {
    "city": (
        "What is the name of the city depicted in the image?",
        "What city is featured in the image?",
        "What is the name of the city in this image?",
        "Which city is shown in the picture?",
        "Can you identify the city shown in the picture?",
    ),
    "country": (
        "In which country is the place in the image?",
        "What country is shown in the picture?",
        "Which country does this image come from?",
        "What is the country of the place in this image?",
        "Name the nation depicted in the image.",
    ),
}
VLKEB_CITY_FRACTION = 0.75
# Portability questions (asked about the edit image after a SYNTH-VLKEB edit) and the hop they use.
PORT_QUESTIONS = {
    "emblem_color": ("What color is the emblem of the city in the image?",
                     "Which color does the emblem of the city shown in the picture have?"),
    "emblem_shape": ("What shape is the emblem of the city in the image?",
                     "Which shape does the emblem of the city shown in the picture have?"),
    "flag": ("What color is the flag of the country in the image?",
             "Which color does the flag of the country shown in the picture have?"),
}
PORT_EDIT_QUESTIONS = {"emblem_color": "What color is the emblem of {}?",
                       "emblem_shape": "What shape is the emblem of {}?",
                       "flag": "What color is the flag of {}?"}

_SYL_START = ("bar", "cal", "dor", "el", "fen", "gal", "har", "ist", "jor", "kel", "lor", "mar",
              "nor", "or", "pel", "quin", "ros", "sal", "tor", "ul", "val", "wen", "yar", "zel")
_SYL_MID = ("a", "e", "i", "o", "u", "an", "en", "in", "on", "ar", "er", "il")
_CITY_END = ("ton", "ford", "holm", "burg", "vale", "port", "mouth", "ley", "grad", "wick",
             "stead", "haven", "field", "more")
_COUNTRY_END = ("ia", "land", "stan", "ora", "mark", "avia", "onia", "ea")

# ----------------------------------------------------------------------------- text facts

_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_OPPOSITES = (("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"),
              ("fast", "slow"), ("happy", "sad"), ("open", "closed"), ("light", "dark"),
              ("wet", "dry"), ("old", "young"), ("hard", "soft"), ("high", "low"),
              ("full", "empty"), ("early", "late"), ("loud", "quiet"), ("rich", "poor"),
              ("strong", "weak"), ("thick", "thin"), ("win", "lose"), ("push", "pull"))
_SOUNDS = (("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
           ("pig", "oink"), ("horse", "neigh"), ("owl", "hoot"), ("lion", "roar"),
           ("snake", "hiss"), ("bee", "buzz"), ("frog", "ribbit"))
_PLURALS = (("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"),
            ("man", "men"), ("woman", "women"), ("goose", "geese"), ("person", "people"),
            ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("box", "boxes"))
_SIDES = (("triangle", "3"), ("square", "4"), ("pentagon", "5"), ("hexagon", "6"),
          ("heptagon", "7"), ("octagon", "8"))
_MIXES = (("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple"),
          ("red", "white", "pink"), ("black", "white", "gray"))


def heldout_template(idx: int, n: int) -> int:
    """Index of the paraphrase template that entity ``idx`` holds out of a list of ``n``.

    A rotation on the entity index, advanced by one every ``n`` entities: consecutive entities
    share their colour signature (and signatures their shape colour and background), so the skew
    keeps a plain ``idx % n`` from lining up with such blocks; every template is spread over
    every attribute value. Each template is held out for ~1/n of the entities and trained with
    all the others."""
    return (idx + idx // n) % n


@dataclass(frozen=True)
class TextFact:
    """A text-only fact; ``questions[heldout]`` is its held-out paraphrase (``heldout`` = the
    fact's index in :func:`text_facts` modulo the number of templates)."""

    family: str
    questions: tuple[str, ...]
    answer: str
    heldout: int

    @property
    def heldout_question(self) -> str:
        return self.questions[self.heldout]

    @property
    def train_questions(self) -> tuple[str, ...]:
        return tuple(q for i, q in enumerate(self.questions) if i != self.heldout)


def text_facts() -> list[TextFact]:
    """The world's text-only facts (230), in a fixed order. Questions are lowercase, no '?'.
    Fact ``i`` holds out template ``i % 3`` of its family, so every template of every family
    is trained with the other facts."""
    facts: list[TextFact] = []

    def add(family: str, answer: str, *questions: str) -> None:
        facts.append(TextFact(family, tuple(questions), answer, len(facts) % len(questions)))

    for i, d in enumerate(_DAYS):
        add("day", _DAYS[(i + 1) % 7], f"what day comes after {d}", f"which day follows {d}",
            f"name the day after {d}")
    for i, m in enumerate(_MONTHS):
        add("month", _MONTHS[(i + 1) % 12], f"what month comes after {m}",
            f"which month follows {m}", f"name the month after {m}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(25):
        a, b = letters[i], letters[i + 1]
        add("letter", b, f"what letter comes after {a}", f"which letter follows {a} in the alphabet",
            f"name the letter after {a}")
    for n in range(1, 51):
        add("successor", str(n + 1), f"what number comes after {n}", f"which number follows {n}",
            f"what is one more than {n}")
    for a in range(1, 10):
        for b in range(1, 10):
            add("addition", str(a + b), f"what is {a} plus {b}", f"how much is {a} plus {b}",
                f"what do you get when you add {a} and {b}")
    for w, o in _OPPOSITES:
        add("opposite", o, f"what is the opposite of {w}", f"which word means the opposite of {w}",
            f"give the antonym of {w}")
    for animal, sound in _SOUNDS:
        add("sound", sound, f"what sound does a {animal} make", f"what noise does a {animal} make",
            f"how does a {animal} sound")
    for w, p in _PLURALS:
        add("plural", p, f"what is the plural of {w}", f"how do you say more than one {w}",
            f"give the plural form of {w}")
    for s, n in _SIDES:
        add("sides", n, f"how many sides does a {s} have", f"what is the number of sides of a {s}",
            f"count the sides of a {s}")
    for a, b, c in _MIXES:
        add("mix", c, f"what color do you get by mixing {a} and {b}",
            f"which color comes from mixing {a} and {b}", f"what do {a} and {b} make when mixed")
    return facts


# ----------------------------------------------------------------------------- entities


@dataclass(frozen=True)
class Entity:
    idx: int
    shape: str
    color: str
    background: str
    frame: str

    @property
    def id(self) -> str:
        return f"e{self.idx:04d}"

    @property
    def signature(self) -> tuple[str, str, str]:
        """The colours a tiny backbone perceives: (shape colour, background, frame)."""
        return (self.color, self.background, self.frame)

    def attrs(self) -> dict:
        return {"shape": self.shape, "color": self.color, "background": self.background,
                "frame": self.frame}


def _contrast(a: str, b: str) -> float:
    return math.dist(COLORS[a], COLORS[b])


def signatures() -> list[tuple[str, str, str]]:
    """Every valid colour signature ``(color, background, frame)``, in canonical order: the
    background differs from both other colours and contrasts with both (:data:`MIN_CONTRAST`)."""
    out = []
    for color in COLORS:
        for bg in COLORS:
            if bg == color or _contrast(color, bg) < MIN_CONTRAST:
                continue
            for frame in COLORS:
                if frame not in (color, bg) and _contrast(frame, bg) >= MIN_CONTRAST:
                    out.append((color, bg, frame))
    return out


def all_entities(seed: int = 0, per_signature: int = 8) -> list[Entity]:
    """The entity universe of ``seed``: for each signature (canonical order), ``per_signature``
    entities with distinct shapes, drawn (and ordered) from the seed (index = ``Entity.idx``)."""
    if not 1 <= per_signature <= len(SHAPES):
        raise ValueError(f"per_signature must be in 1..{len(SHAPES)}, got {per_signature}")
    rng = random.Random(f"{seed}:shapes")
    out = []
    for color, bg, frame in signatures():
        for shape in rng.sample(SHAPES, per_signature):
            out.append(Entity(len(out), shape, color, bg, frame))
    return out


def _make_names(rng: random.Random, n: int, endings: Sequence[str], taken: set) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        parts = [rng.choice(_SYL_START)]
        if rng.random() < 0.6:
            parts.append(rng.choice(_SYL_MID))
        parts.append(rng.choice(endings))
        name = "".join(parts).capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


@dataclass
class World:
    """The seed-dependent part of the world: knowledge lookups and the entity universe."""

    seed: int
    entities: list[Entity]
    cities: dict  # "shape|color" -> city name
    countries: dict  # background colour -> country name

    def city(self, e: Entity) -> str:
        return self.cities[f"{e.shape}|{e.color}"]

    def country(self, e: Entity) -> str:
        return self.countries[e.background]


def build_world(seed: int = 0, per_signature: int = 8) -> World:
    """Entities and knowledge lookups (cities, countries) for ``seed``; deterministic."""
    rng = random.Random(f"{seed}:names")
    taken: set = set()
    pairs = [f"{s}|{c}" for s in SHAPES for c in COLORS]
    city_names = _make_names(rng, len(pairs), _CITY_END, taken)
    country_names = _make_names(rng, len(COLORS), _COUNTRY_END, taken)
    return World(seed, all_entities(seed, per_signature), dict(zip(pairs, city_names)),
                 dict(zip(COLORS, country_names)))


def vqa_answer(e: Entity, qtype: str) -> str:
    if qtype == "color":
        return e.color
    if qtype == "background":
        return e.background
    if qtype == "frame":
        return e.frame
    raise ValueError(f"unknown VQA question type {qtype!r}; expected one of {VQA_TYPES}")


def vqa_alt(rng: random.Random, e: Entity) -> str:
    """A wrong answer to a VQA question (all ask for a colour): none of the image's three
    colours, so the edit target is never a colour of the image."""
    return rng.choice([c for c in COLORS if c not in e.signature])


def _a(word: str) -> str:
    """``word`` with its indefinite article ("an orange", "a red")."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(e: Entity) -> str:
    """E.g. "a red star on a blue background with a green frame"."""
    return f"{_a(e.color)} {e.shape} on {_a(e.background)} background with {_a(e.frame)} frame"


ALT_CAPTION_LEAD = "sketch"  # first word of every SYNTH-EIC edit target; no true caption's


def alt_caption(rng: random.Random, e: Entity) -> str:
    """SYNTH-EIC edit target: a plausible but wrong description of ``e``, in a phrasing that the
    pretraining corpus never uses (``"sketch of the {shape} in {colour}"``), with a wrong shape
    and a colour that is none of the image's three colours. A model that knows the world
    predicts none of its tokens: a true caption starts with "a" / "an", never with
    :data:`ALT_CAPTION_LEAD`, and "the" (not "a", which follows "of" in the caption prompts)
    is never a pretraining target word."""
    shape = rng.choice([s for s in SHAPES if s != e.shape])
    color = rng.choice([c for c in COLORS if c not in e.signature])
    return f"{ALT_CAPTION_LEAD} of the {shape} in {color}"


def vlkeb_answer(world: World, e: Entity, qtype: str) -> str:
    if qtype == "city":
        return world.city(e)
    if qtype == "country":
        return world.country(e)
    raise ValueError(f"unknown VLKEB question type {qtype!r}; expected one of {VLKEB_TYPES}")


def portability_item(world: World, e: Entity, qtype: str, alt: str, rng: random.Random) -> dict:
    """The one-hop portability question of a SYNTH-VLKEB edit of ``e`` (question type ``qtype``, new
    answer ``alt``), in VLKEB's ``port_new`` item schema. Its answer is an attribute of the new city's
    emblem or the new country's flag, chosen so that it is not what the unedited picture shows: the
    emblem's colour unless that is one of the image's colours, else the emblem's shape (when it
    differs from the pictured shape); the flag's colour always differs from the background."""
    if qtype == "city":
        shape, color = next(k for k, v in world.cities.items() if v == alt).split("|")
        kind, answer = ("emblem_color", color)
        if color in e.signature and shape != e.shape:
            kind, answer = ("emblem_shape", shape)
    elif qtype == "country":
        kind, answer = "flag", next(k for k, v in world.countries.items() if v == alt)
    else:
        raise ValueError(f"unknown VLKEB question type {qtype!r}; expected one of {VLKEB_TYPES}")
    return {"port_edit_q": PORT_EDIT_QUESTIONS[kind].format(alt), "port_edit_a": answer,
            "port_q": rng.choice(PORT_QUESTIONS[kind]), "port_a": answer}


# ----------------------------------------------------------------------------- rendering

def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)]
    if shape == "triangle":
        return [(math.cos(a) * 1.05, math.sin(a) * 1.05 + 0.18)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))
        return pts
    if shape == "cross":
        w = 0.34
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                (-1, w), (-1, -w), (-w, -w)]
    raise ValueError(f"{shape!r} is not a polygon shape")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rot: float) -> None:
    """Draw one shape of radius ``r`` (pixels) into a mode-"L" mask."""
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            ri = r * 0.52
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
        elif shape == "crescent":
            ox, oy = 0.5 * r, -0.2 * r
            c, s = math.cos(rot), math.sin(rot)
            ox, oy = c * ox - s * oy, s * ox + c * oy
            ri = r * 0.75
            draw.ellipse((cx + ox - ri, cy + oy - ri, cx + ox + ri, cy + oy + ri), fill=0)
        return
    c, s = math.cos(rot), math.sin(rot)
    pts = [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in _unit_polygon(shape)]
    draw.polygon(pts, fill=255)


# Radius of the shape and jitter of its centre, in fractions of the side inside the frame: as
# large as fits, so the shape's colour covers a big region even at 32 px. A shape reaches at most
# 1.151 radii from its centre (triangle vertex) at scale <= 1.08, i.e. 1.243 radii, and
# 0.05 + 1.243 * 0.34 = 0.473 < 0.5: always inside the frame, with >= 0.6 px (2x mask) to spare
# at 16 px.
SHAPE_RADIUS = 0.34
SHAPE_JITTER = 0.05


def frame_width(size: int) -> int:
    """Width in pixels of the frame drawn around every render (6 px at 64 px)."""
    return max(1, round(size / 10))


def _shape_mask(e: Entity, rng: np.random.Generator, size: int) -> np.ndarray:
    """Coverage in [0, 1] of the shape, ``size`` x ``size``, zero on the frame band."""
    ss = size * 2  # draw the mask at 2x and downsample for smooth edges
    inner = ss - 4 * frame_width(size)  # side of the area inside the frame, at 2x
    mask = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(mask)
    r = SHAPE_RADIUS * inner * rng.uniform(0.9, 1.08)
    jx, jy = rng.uniform(-SHAPE_JITTER * inner, SHAPE_JITTER * inner, size=2)
    rot = math.radians(rng.uniform(-12, 12))
    _draw_shape(draw, e.shape, ss / 2 + jx, ss / 2 + jy, r, rot)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def render_entity(e: Entity, k: int, seed: int, size: int = 64) -> Image.Image:
    """Render ``k`` of entity ``e``: deterministic in ``(seed, e.idx, k, size)``.

    Renders 0 and 1 are the datasets' (edit image / rephrased image); use ``k >= 2`` for
    any extra pretraining augmentation.
    """
    rng = np.random.default_rng([seed, e.idx, k, 7919])
    m = _shape_mask(e, rng, size)
    fg = np.clip(np.array(COLORS[e.color], np.float32) + rng.uniform(-10, 10, 3), 0, 255)
    bg = np.clip(np.array(COLORS[e.background], np.float32) + rng.uniform(-10, 10, 3), 0, 255)
    fr = np.clip(np.array(COLORS[e.frame], np.float32) + rng.uniform(-10, 10, 3), 0, 255)
    img = bg[None, None, :] * (1 - m[..., None]) + fg[None, None, :] * m[..., None]
    # The frame is painted over the whole border, so no jitter hides it.
    w = frame_width(size)
    for band in (np.s_[:w, :], np.s_[-w:, :], np.s_[:, :w], np.s_[:, -w:]):
        img[band] = fr
    # Luminance noise on a half-resolution grid: variation without bloating the PNGs.
    half = max(size // 2, 1)
    noise = rng.normal(0.0, 5.0, (half, half, 1)).astype(np.float32)
    noise = np.repeat(np.repeat(noise, size // half, 0), size // half, 1)
    img = np.clip(np.rint(img + noise[:size, :size]), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # no pnginfo: no timestamps / metadata
    return buf.getvalue()


def _render_chunk(args) -> int:
    """Worker: render ``[(entity_tuple, k, [abs paths])]``; return how many were rendered."""
    seed, size, tasks = args
    for ent_t, k, paths in tasks:
        data = _png_bytes(render_entity(Entity(*ent_t), k, seed, size))
        for p in paths:
            with open(p, "wb") as f:
                f.write(data)
    return len(tasks)


def run_render_tasks(worker, tasks: list, seed: int, size: int, workers: int, progress: bool,
                     desc: str = "render") -> None:
    """Run ``worker((seed, size, chunk of tasks))`` (a module-level function returning how many tasks
    it did) over ``tasks``: in ``workers`` spawned processes when > 1, with a progress bar."""
    chunk = max(1, min(200, math.ceil(len(tasks) / (4 * max(workers, 1)))))
    chunks = [(seed, size, tasks[i:i + chunk]) for i in range(0, len(tasks), chunk)]
    bar = (_tqdm(total=len(tasks), desc=desc, unit="img", file=sys.stderr, mininterval=0.5)
           if progress and _tqdm is not None and tasks else None)
    try:
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
                for done in ex.map(worker, chunks):
                    if bar is not None:
                        bar.update(done)
        else:
            for c in chunks:
                done = worker(c)
                if bar is not None:
                    bar.update(done)
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class WorldConfig:
    """Everything the generated world depends on (the manifest stores it)."""

    seed: int = 0
    n_train: int = 2000  # records per dataset, train split
    n_eval: int = 1000  # records per dataset, eval split
    n_val: int = 500  # records per dataset, val split (configs are tuned on it; entities of its own)
    n_loc: int = 500  # entities of the m_loc pool (never edited; reserved signatures only)
    pretrain_renders: int = 2  # pretraining renders per entity (k = 2 .. 1 + pretrain_renders)
    extra_entities: int = -1  # entities beyond train/eval/loc that get pretraining renders (-1: all)
    n_heldout_renders: int = 500  # dataset renders sampled into pretrain/heldout.json
    image_size: int = 64
    entities_per_signature: int = 8  # entities per colour signature, one per shape (1..8)
    n_general: int = 1000  # questions of the general-capability VQA set (general/vqa_general.json)

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"WorldConfig.{f.name} must be an int, got {v!r}")
        if self.seed < 0:
            raise ValueError(f"WorldConfig.seed must be >= 0, got {self.seed}")
        for name in ("n_train", "n_eval", "n_val", "n_loc", "pretrain_renders", "n_general"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.extra_entities < -1:
            raise ValueError(f"WorldConfig.extra_entities must be >= -1, got {self.extra_entities}")
        if self.n_heldout_renders < 0:
            raise ValueError(f"WorldConfig.n_heldout_renders must be >= 0, got {self.n_heldout_renders}")
        if not 1 <= self.entities_per_signature <= len(SHAPES):
            raise ValueError(f"WorldConfig.entities_per_signature must be in 1..{len(SHAPES)}, "
                             f"got {self.entities_per_signature}")
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"WorldConfig.image_size must be an even int >= 16, got {self.image_size}")


def _split_universe(cfg: WorldConfig, ents: Sequence[Entity], rng: random.Random):
    """Entity indices -> (train, eval, loc, extra) pools, pairwise disjoint, and the reserved
    signatures. The m_loc pool takes its entities from reserved signatures only, which no edit
    entity has, so an m_loc image never shows the colours of an edited one. Edit entities are
    dealt round-robin over shuffled signatures, so consecutive records differ in colours."""
    by_sig: dict[tuple, list[int]] = {}
    for e in ents:
        by_sig.setdefault(e.signature, []).append(e.idx)
    sigs = list(by_sig)
    rng.shuffle(sigs)
    n_res = min(len(sigs) - 1, max(1, round(LOC_SIGNATURE_FRACTION * len(sigs))))
    reserved, edit_sigs = sigs[:n_res], sigs[n_res:]
    loc_cands = [i for sig in reserved for i in by_sig[sig]]
    rng.shuffle(loc_cands)
    n_loc = min(cfg.n_loc, len(loc_cands))
    groups = [rng.sample(by_sig[sig], len(by_sig[sig])) for sig in edit_sigs]
    order = [g[r] for r in range(max(map(len, groups))) for g in groups if r < len(g)]
    if cfg.n_train + cfg.n_eval + cfg.n_val <= len(order):
        n_tr, n_ev, n_va = cfg.n_train, cfg.n_eval, cfg.n_val
    else:  # not enough entities for one per record: split proportionally, records cycle
        if len(order) < 3:
            raise ValueError(f"the world has {len(order)} edit entities; train, eval and val need 3")
        total = cfg.n_train + cfg.n_eval + cfg.n_val
        n_tr = max(1, round(len(order) * cfg.n_train / total))
        n_va = max(1, round(len(order) * cfg.n_val / total))
        n_tr = min(n_tr, len(order) - n_va - 1)
        n_ev = len(order) - n_tr - n_va
    train, ev = order[:n_tr], order[n_tr:n_tr + n_ev]
    extra = order[n_tr + n_ev:] + loc_cands[n_loc:]  # pretrained, never in a dataset
    rng.shuffle(extra)
    # The val split takes the next entities of the edit order out of ``extra`` (after the same
    # shuffle as format 8, so the pretraining corpus, which covers every entity, is unchanged).
    val = order[n_tr + n_ev:n_tr + n_ev + n_va]
    in_val = set(val)
    extra = [i for i in extra if i not in in_val]
    if cfg.extra_entities >= 0:
        extra = extra[:cfg.extra_entities]
    return train, ev, val, loc_cands[:n_loc], extra, sorted(reserved)


# Paraphrase lists of the image examples: (kind, question type, templates, examples per
# pretraining render).
_PRETRAIN_LISTS = (
    *(("vqa", qt, VQA_QUESTIONS[qt], 2) for qt in VQA_TYPES),
    ("caption", "caption", CAPTION_PROMPTS, 2),
    ("vlkeb", "city", VLKEB_QUESTIONS["city"], 2),
    ("vlkeb", "country", VLKEB_QUESTIONS["country"], 1),
)


def entity_templates(idx: int, templates: Sequence[str]) -> tuple[str, list[str]]:
    """``(held-out template, trained templates)`` of entity ``idx`` for one paraphrase list."""
    h = heldout_template(idx, len(templates))
    return templates[h], [q for i, q in enumerate(templates) if i != h]


class _Builder:
    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.world = build_world(cfg.seed, cfg.entities_per_signature)
        self.ents = self.world.entities
        self.facts = text_facts()
        rng = random.Random(f"{cfg.seed}:split")
        self.train, self.eval, self.val, self.loc, self.extra, self.reserved = _split_universe(
            cfg, self.ents, rng)
        # True while the val split is built: its images go to ``more_renders``, so the held-out
        # pretraining set (sampled from ``renders``) stays what format 8 wrote.
        self._val_images = False
        # (entity idx, k) -> list of paths relative to <out>. ``renders`` holds exactly what
        # format 7 rendered (pretrain/heldout.json samples from it, so it stays byte-identical);
        # ``more_renders`` the train near-miss m_loc images (rendered too, never sampled).
        self.renders: dict[tuple[int, int], list[str]] = {}
        self.more_renders: dict[tuple[int, int], list[str]] = {}
        self._near: dict[tuple, list[int]] = {}

    # -- image paths --------------------------------------------------------------------
    def _need(self, idx: int, k: int, rel: str, more: bool = False) -> None:
        paths = (self.more_renders if more or self._val_images else self.renders).setdefault((idx, k), [])
        if rel not in paths:
            paths.append(rel)

    def mm_image(self, split: str, idx: int, k: int, more: bool = False) -> str:
        """Path relative to easy-edit-mm/images."""
        rel = f"{split}/{self.ents[idx].id}_{k}.png"
        self._need(idx, k, "easy-edit-mm/images/" + rel, more)
        return rel

    def kb_image(self, idx: int, k: int, more: bool = False) -> str:
        """Path relative to VLKEB/mmkb_images."""
        rel = f"{self.ents[idx].id}/render_{k}.png"
        self._need(idx, k, "VLKEB/mmkb_images/" + rel, more)
        return rel

    def pt_image(self, idx: int, k: int) -> str:
        rel = f"pretrain/images/{self.ents[idx].id}_{k}.png"
        self._need(idx, k, rel)
        return rel

    # -- helpers ------------------------------------------------------------------------
    def _loc(self, rng: random.Random, prefix: str) -> tuple[str, str]:
        """Text locality question (a trained template of a random fact) and its answer."""
        f = rng.choice(self.facts)
        return prefix + rng.choice(f.train_questions), f.answer

    def near_misses(self, e: Entity) -> list[int]:
        """m_loc pool entities sharing exactly 2 of the 3 colours of ``e``'s signature."""
        sig = e.signature
        if sig not in self._near:
            self._near[sig] = [i for i in self.loc
                               if sum(a == b for a, b in zip(sig, self.ents[i].signature)) == 2]
        return self._near[sig]

    def _mloc(self, rng: random.Random, nm: random.Random | None, e: Entity, img
              ) -> tuple[str, Entity]:
        """(m_loc path, entity) of a record on edit entity ``e``; ``img(idx, more)`` registers
        and returns the path. The random pool draw of format 7 is always made and registered
        (same ``rng`` stream and renders, so pretrain/heldout.json is unchanged); for train
        (``nm`` given) a near miss of ``e`` replaces it when the pool has one."""
        le = self.ents[rng.choice(self.loc)]
        path = img(le.idx, False)
        near = self.near_misses(e) if nm is not None else []
        if near:
            le = self.ents[nm.choice(near)]
            path = img(le.idx, True)
        return path, le

    def _nm_rng(self, name: str, split: str) -> random.Random | None:
        """Draws the near misses of a train split (None: eval, m_loc stays random)."""
        return random.Random(f"{self.cfg.seed}:nearmiss:{name}") if split == "train" else None

    def _vqa_mloc(self, rng: random.Random, nm: random.Random | None, e: Entity
                  ) -> tuple[str, str, str]:
        path, le = self._mloc(rng, nm, e, lambda i, more: self.mm_image("loc", i, 0, more))
        qt = rng.choice(VQA_TYPES)
        return path, rng.choice(VQA_QUESTIONS[qt]), vqa_answer(le, qt)

    @staticmethod
    def _cycle(pool: Sequence[int], n: int) -> list[int]:
        return [pool[i % len(pool)] for i in range(n)]

    # -- datasets -----------------------------------------------------------------------
    # Every template of every list is pretrained, so src / rephrase may use any two of them.
    def evqa(self, split: str, pool: Sequence[int], n: int) -> list[dict]:
        rng = random.Random(f"{self.cfg.seed}:evqa:{split}")
        nm = self._nm_rng("evqa", split)
        recs = []
        for idx in self._cycle(pool, n):
            e = self.ents[idx]
            qt = rng.choice(VQA_TYPES)
            src, reph = rng.sample(VQA_QUESTIONS[qt], 2)
            loc, loc_ans = self._loc(rng, NQ_PREFIX)
            m_loc, m_q, m_a = self._vqa_mloc(rng, nm, e)
            recs.append({
                "src": src, "rephrase": reph, "pred": vqa_answer(e, qt), "alt": vqa_alt(rng, e),
                "image": self.mm_image(split, idx, 0),
                "image_rephrase": self.mm_image("rephrase", idx, 1),
                "loc": loc, "loc_ans": loc_ans,
                "m_loc": m_loc, "m_loc_q": m_q, "m_loc_a": m_a,
            })
        return recs

    def eic(self, split: str, pool: Sequence[int], n: int) -> list[dict]:
        rng = random.Random(f"{self.cfg.seed}:eic:{split}")
        nm = self._nm_rng("eic", split)
        recs = []
        for idx in self._cycle(pool, n):
            e = self.ents[idx]
            reph = rng.choice([p for p in CAPTION_PROMPTS if p != CAPTION_SRC])
            loc, loc_ans = self._loc(rng, NQ_PREFIX)
            m_loc, m_q, m_a = self._vqa_mloc(rng, nm, e)
            recs.append({
                "src": CAPTION_SRC, "rephrase": reph, "pred": caption(e),
                "alt": alt_caption(rng, e),
                "image": self.mm_image(split, idx, 0),
                "image_rephrase": self.mm_image("rephrase", idx, 1),
                "loc": loc, "loc_ans": loc_ans,
                "m_loc": m_loc, "m_loc_q": m_q, "m_loc_a": m_a,
            })
        return recs

    def vlkeb(self, split: str, pool: Sequence[int], n: int) -> list[dict]:
        rng = random.Random(f"{self.cfg.seed}:vlkeb:{split}")
        w = self.world
        cities = sorted(set(w.cities.values()))
        countries = sorted(set(w.countries.values()))
        nm = self._nm_rng("vlkeb", split)
        # portability questions draw from a stream of their own: every other field stays as in format 9
        port_rng = random.Random(f"{self.cfg.seed}:port:{split}")
        recs = []
        for idx in self._cycle(pool, n):
            e = self.ents[idx]
            qt = "city" if rng.random() < VLKEB_CITY_FRACTION else "country"
            src, reph = rng.sample(VLKEB_QUESTIONS[qt], 2)
            pred = vlkeb_answer(w, e, qt)
            alt = rng.choice([v for v in (cities if qt == "city" else countries) if v != pred])
            loc, loc_ans = self._loc(rng, "")
            m_loc, le = self._mloc(rng, nm, e, lambda i, more: self.kb_image(i, 0, more))
            mqt = "city" if rng.random() < VLKEB_CITY_FRACTION else "country"
            recs.append({
                "src": src, "rephrase": reph, "pred": pred, "alt": alt,
                "image": self.kb_image(idx, 0),
                "image_rephrase": self.kb_image(idx, 1),
                "loc": loc, "loc_ans": loc_ans,
                "m_loc": m_loc,
                "m_loc_q": rng.choice(VLKEB_QUESTIONS[mqt]),
                "m_loc_a": vlkeb_answer(w, le, mqt),
                "port_new": [portability_item(w, e, qt, alt, port_rng)],
            })
        return recs

    # -- general capability -------------------------------------------------------------
    def general(self) -> list[dict]:
        """The general-capability VQA set: ``n_general`` (entity, question type) pairs drawn among the
        pretrained entities with reserved signatures (never edited, nor any entity sharing their
        colours), each asked with one of the entity's trained templates about a fresh render. Call
        after :meth:`pretrain`; its images are never sampled into the held-out set."""
        rng = random.Random(f"{self.cfg.seed}:general")
        reserved = set(self.reserved)
        pool = sorted(i for i in set(self.loc) | set(self.extra) if self.ents[i].signature in reserved)
        pairs = [(i, qt) for i in pool for qt in VQA_TYPES]
        out = []
        for idx, qt in sorted(rng.sample(pairs, min(self.cfg.n_general, len(pairs)))):
            e = self.ents[idx]
            rel = f"images/{e.id}_{GENERAL_RENDER}.png"
            self._need(idx, GENERAL_RENDER, f"general/{rel}", more=True)
            question = rng.choice(entity_templates(idx, VQA_QUESTIONS[qt])[1])
            out.append({"question_id": len(out), "question": question, "image": rel,
                        "answers": [vqa_answer(e, qt)], "entity": e.id, "question_type": qt})
        return out

    # -- pretraining corpus -------------------------------------------------------------
    def _examples(self, rng: random.Random, e: Entity, mm_path: str, kb_path: str,
                  picks: Sequence[Sequence[str]], trained: bool) -> list[dict]:
        """Examples about one render of ``e``: ``picks[i]`` are the templates to use from
        ``_PRETRAIN_LISTS[i]``. ``trained``: templates that ``e`` trains on (VLKEB prompts then
        get " The answer is:" 30% of the time) rather than the ones it holds out."""
        out = []
        for (kind, qt, _, _), qs in zip(_PRETRAIN_LISTS, picks):
            for q in qs:
                if kind == "vqa":
                    out.append({"image": mm_path, "prompt": q + VQA_SUFFIX,
                                "target": vqa_answer(e, qt), "kind": kind})
                elif kind == "caption":
                    out.append({"image": mm_path, "prompt": q, "target": caption(e),
                                "kind": kind})
                else:
                    # VLKEB prompts are used as is; M-Loc adds " The answer is:" (DESIGN section 4)
                    suffix = trained and rng.random() < 0.3
                    out.append({"image": kb_path, "prompt": q + VQA_SUFFIX if suffix else q,
                                "target": vlkeb_answer(self.world, e, qt), "kind": kind})
        return out

    def _heldout_picks(self, e: Entity) -> list[list[str]]:
        return [[entity_templates(e.idx, qs)[0]] for _, _, qs, _ in _PRETRAIN_LISTS]

    def pretrain(self) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:pretrain")
        train: list[dict] = []
        pt_entities = sorted(set(self.train) | set(self.eval) | set(self.val) | set(self.loc) | set(self.extra))
        for idx in pt_entities:
            e = self.ents[idx]
            # The entity's trained templates of each list in a random order, dealt out over its
            # renders: each one is used before any repeats.
            orders = [rng.sample(tr, len(tr))
                      for tr in (entity_templates(idx, qs)[1] for _, _, qs, _ in _PRETRAIN_LISTS)]
            for j, k in enumerate(range(2, 2 + cfg.pretrain_renders)):
                p = self.pt_image(idx, k)
                picks = [[order[(j * m + t) % len(order)] for t in range(m)]
                         for order, (_, _, _, m) in zip(orders, _PRETRAIN_LISTS)]
                train.extend(self._examples(rng, e, p, p, picks, trained=True))
        for f in self.facts:
            for q in f.train_questions:
                for prefix in (NQ_PREFIX, ""):
                    train.append({"image": None, "prompt": f"{prefix}{q}?", "target": f.answer,
                                  "kind": "text"})

        held: list[dict] = []
        # held-out renders: the dataset renders (k=0 edit images / m_loc, k=1 rephrase images),
        # asked with trained templates ("render") and with held-out ones ("render+paraphrase")
        ds_renders = sorted((idx, k) for (idx, k), paths in self.renders.items() if k <= 1)
        n = min(cfg.n_heldout_renders, len(ds_renders))
        for idx, k in rng.sample(ds_renders, n):
            e = self.ents[idx]
            paths = self.renders[(idx, k)]
            mm = next((p for p in paths if p.startswith("easy-edit-mm/")), None)
            kb = next((p for p in paths if p.startswith("VLKEB/")), None)
            mm = mm or kb
            kb = kb or mm
            picks = [rng.sample(entity_templates(idx, qs)[1], m) for _, _, qs, m in _PRETRAIN_LISTS]
            for ex in self._examples(rng, e, mm, kb, picks, trained=True):
                held.append({**ex, "heldout": "render"})
            for ex in self._examples(rng, e, mm, kb, self._heldout_picks(e), trained=False):
                held.append({**ex, "heldout": "render+paraphrase"})
        # held-out paraphrases on (a sample of) pretraining renders: (entity, template) pairs
        # that pretraining never shows
        pt_renders = sorted(key for key in self.renders if key[1] >= 2)
        for idx, k in rng.sample(pt_renders, min(n, len(pt_renders))):
            p = self.renders[(idx, k)][0]
            e = self.ents[idx]
            for ex in self._examples(rng, e, p, p, self._heldout_picks(e), trained=False):
                held.append({**ex, "heldout": "paraphrase"})
        for f in self.facts:
            for prefix in (NQ_PREFIX, ""):
                held.append({"image": None, "prompt": f"{prefix}{f.heldout_question}?",
                             "target": f.answer, "kind": "text", "heldout": "paraphrase"})
        return train, held

    def entities_table(self) -> list[dict]:
        split_of = {}
        for name, pool in (("train", self.train), ("eval", self.eval), ("val", self.val),
                           ("loc", self.loc), ("extra", self.extra)):
            for i in pool:
                split_of[i] = name
        reserved = set(self.reserved)
        rows = []
        for e in self.ents:
            rows.append({"id": e.id, **e.attrs(), "city": self.world.city(e),
                         "country": self.world.country(e), "split": split_of.get(e.idx, "unused"),
                         "reserved": e.signature in reserved, "caption": caption(e)})
        return rows


def _dump_records(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")


def _dump_lines(path: Path, records: list) -> None:
    """A JSON list with one compact record per line (much smaller than indent=1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in records))
        f.write("\n]\n")


def _write_world(root: Path, cfg: WorldConfig, workers: int, progress: bool) -> dict:
    b = _Builder(cfg)
    datasets = {
        "evqa_train": b.evqa("train", b.train, cfg.n_train),
        "evqa_eval": b.evqa("eval", b.eval, cfg.n_eval),
        "eic_train": b.eic("train", b.train, cfg.n_train),
        "eic_eval": b.eic("eval", b.eval, cfg.n_eval),
        "vlkeb_train": b.vlkeb("train", b.train, cfg.n_train),
        "vlkeb_eval": b.vlkeb("eval", b.eval, cfg.n_eval),
    }
    pre_train, pre_held = b.pretrain()
    b._val_images = True  # after pretrain(): the held-out set never samples val renders
    datasets.update({"evqa_val": b.evqa("val", b.val, cfg.n_val), "eic_val": b.eic("val", b.val, cfg.n_val),
                     "vlkeb_val": b.vlkeb("val", b.val, cfg.n_val)})
    general = b.general()

    # Render every needed (entity, k) once; write its bytes to every path that uses it.
    renders = {key: list(ps) for key, ps in b.renders.items()}
    for key, ps in b.more_renders.items():
        renders.setdefault(key, []).extend(p for p in ps if p not in renders.get(key, ()))
    keys = sorted(renders)
    for d in {str(Path(p).parent) for ps in renders.values() for p in ps}:
        (root / d).mkdir(parents=True, exist_ok=True)
    tasks = [(astuple_entity(b.ents[i]), k, [str(root / p) for p in renders[(i, k)]])
             for i, k in keys]
    run_render_tasks(_render_chunk, tasks, cfg.seed, cfg.image_size, workers, progress)

    for name, recs in datasets.items():
        _dump_records(root / DATASET_FILES[name][0], recs)
    _dump_lines(root / PRETRAIN_FILES["train"], pre_train)
    _dump_lines(root / PRETRAIN_FILES["heldout"], pre_held)
    _dump_lines(root / "entities.json", b.entities_table())
    _dump_lines(root / GENERAL_FILE, general)

    manifest = {
        "format": "liveedit-synthetic-world",
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "datasets": {name: {"file": DATASET_FILES[name][0], "image_root": DATASET_FILES[name][1],
                            "records": len(recs)} for name, recs in datasets.items()},
        "pretrain": {"train": {"file": PRETRAIN_FILES["train"], "examples": len(pre_train)},
                     "heldout": {"file": PRETRAIN_FILES["heldout"], "examples": len(pre_held)}},
        "general": {"file": GENERAL_FILE, "questions": len(general), "render": GENERAL_RENDER},
        "entities": {"total": len(b.ents), "train": len(b.train), "eval": len(b.eval), "val": len(b.val),
                     "loc": len(b.loc), "extra": len(b.extra), "file": "entities.json",
                     "signatures": len({e.signature for e in b.ents}),
                     "loc_signatures": [list(sig) for sig in b.reserved]},
        "images": {"renders": len(keys), "files": sum(len(v) for v in renders.values()),
                   "size": cfg.image_size},
        "vocabulary": {
            "shapes": list(SHAPES), "colors": {k: list(v) for k, v in COLORS.items()},
            "backgrounds": list(COLORS), "frames": list(COLORS),
            "cities": b.world.cities, "countries": b.world.countries,
            "vqa_questions": {k: list(v) for k, v in VQA_QUESTIONS.items()},
            "caption_prompts": list(CAPTION_PROMPTS),
            "vlkeb_questions": {k: list(v) for k, v in VLKEB_QUESTIONS.items()},
            "heldout_paraphrase": "per item: entity idx holds out template "
                                  "(idx + idx // n) % n of each list of n; text fact i holds "
                                  "out template i % n; every template is trained",
            "text_facts": len(b.facts),
        },
    }
    with open(root / MANIFEST, "w", encoding="utf-8") as f:  # last: marks the world complete
        json.dump(manifest, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def astuple_entity(e: Entity) -> tuple:
    return (e.idx, e.shape, e.color, e.background, e.frame)


# ----------------------------------------------------------------------------- public API


def read_manifest(out_dir: os.PathLike | str) -> dict | None:
    """The world's manifest, or None when ``out_dir`` holds no complete world."""
    p = Path(out_dir) / MANIFEST
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if m.get("format") != "liveedit-synthetic-world":
        return None
    return m


def is_complete(out_dir: os.PathLike | str, config: WorldConfig) -> bool:
    m = read_manifest(out_dir)
    return (m is not None and m.get("format_version") == FORMAT_VERSION
            and m.get("config") == asdict(config))


def generate_world(out_dir: os.PathLike | str, config: WorldConfig = WorldConfig(),
                   workers: int = 2, progress: bool = True) -> Path:
    """(Re)generate the world into ``out_dir`` atomically and return its path.

    Everything is written into a temporary sibling folder which then replaces ``out_dir``;
    an interrupted run leaves ``out_dir`` untouched. An existing ``out_dir`` is replaced only
    if it is empty or holds a world (has a manifest); anything else is an error. Concurrent
    generators of the same folder take turns (a file lock beside it).
    """
    config.validate()
    out = Path(out_dir).absolute()
    with build_lock(out, f"the synthetic world in {out}"):
        return _generate_locked(out, config, workers, progress)


def _generate_locked(out: Path, config: WorldConfig, workers: int, progress: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"world output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and read_manifest(out) is None:
        raise FileExistsError(
            f"world output {out} exists, is not empty and holds no {MANIFEST}; "
            f"refusing to replace it (choose another --out or remove it)")
    remove_temporaries(out.parent, out.name)   # left by a generator that was killed
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        _write_world(tmp, config, workers, progress)
    if progress:
        print(f"synthetic world (seed {config.seed}) written to {out} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def ensure_world(out_dir: os.PathLike | str, seed: int = 0, workers: int = 2,
                 progress: bool = True, **sizes) -> Path:
    """Return ``out_dir`` holding the world for ``seed`` (and ``sizes``, see :class:`WorldConfig`),
    generating it only when no complete world with that configuration is there."""
    unknown = set(sizes) - {f.name for f in fields(WorldConfig)} - {"seed"}
    if unknown:
        raise TypeError(f"unknown world size argument(s) {sorted(unknown)}; expected some of "
                        f"{[f.name for f in fields(WorldConfig) if f.name != 'seed']}")
    config = WorldConfig(seed=seed, **sizes)
    config.validate()
    out = Path(out_dir).absolute()
    # The processes of a multi-process launch all get here on a fresh clone: the first generates,
    # the others wait for it and then find the world complete.
    build_once(out, lambda: is_complete(out, config), lambda: _generate_locked(out, config, workers, progress),
               f"the synthetic world in {out}")
    return out


def load_dataset(out_dir: os.PathLike | str, name: str) -> tuple[list[dict], Path]:
    """Records of dataset ``name`` (a key of :data:`DATASET_FILES`) and their image root."""
    if name not in DATASET_FILES:
        raise KeyError(f"unknown synthetic dataset {name!r}; known: {sorted(DATASET_FILES)}")
    rel, root = DATASET_FILES[name]
    with open(Path(out_dir) / rel, encoding="utf-8") as f:
        return json.load(f), Path(out_dir) / root


def load_pretrain(out_dir: os.PathLike | str, split: str = "train") -> list[dict]:
    """The pretraining corpus (``split="train"``) or held-out set (``"heldout"``).
    ``image`` is relative to ``out_dir`` (or None for text-only examples)."""
    if split not in PRETRAIN_FILES:
        raise KeyError(f"unknown pretraining split {split!r}; known: {sorted(PRETRAIN_FILES)}")
    with open(Path(out_dir) / PRETRAIN_FILES[split], encoding="utf-8") as f:
        return json.load(f)


def _with_target(prompt: str, target: str) -> str:
    return prompt + target if prompt.endswith((" ", "\n", "\t")) else f"{prompt} {target}"


def iter_text_corpus(out_dir: os.PathLike | str) -> Iterator[str]:
    """Every text of the world (may repeat): prompts, targets, full "prompt target" strings of
    the pretraining corpus and held-out set, every string field of every dataset record
    (``alt`` included) in the evaluation's prompt formats, and the answer vocabulary."""
    out = Path(out_dir)
    m = read_manifest(out)
    if m is None:
        raise FileNotFoundError(f"no complete synthetic world in {out} (missing {MANIFEST})")
    voc = m["vocabulary"]
    yield from voc["shapes"]
    yield from voc["backgrounds"]
    yield from voc["cities"].values()
    yield from voc["countries"].values()
    for f in text_facts():
        yield f.answer
        for q in f.questions:
            yield _with_target(f"{NQ_PREFIX}{q}?", f.answer)
            yield _with_target(f"{q}?", f.answer)
    for split in PRETRAIN_FILES:
        for ex in load_pretrain(out, split):
            yield ex["prompt"]
            yield ex["target"]
            yield _with_target(ex["prompt"], ex["target"])
    for name in DATASET_FILES:
        recs, _ = load_dataset(out, name)
        vqa_style = name.startswith("evqa")
        for r in recs:
            for key in ("src", "rephrase", "pred", "alt", "loc", "loc_ans", "m_loc_q", "m_loc_a"):
                yield r[key]
            for q in (r["src"], r["rephrase"]):
                prompt = q + VQA_SUFFIX if vqa_style else q
                yield _with_target(prompt, r["alt"])
                yield _with_target(prompt, r["pred"])
            yield _with_target(r["loc"] + "?", r["loc_ans"])
            yield _with_target(r["m_loc_q"] + VQA_SUFFIX, r["m_loc_a"])


def text_corpus(out_dir: os.PathLike | str) -> list[str]:
    """:func:`iter_text_corpus` without duplicates, in first-seen order (for BPE training)."""
    return list(dict.fromkeys(iter_text_corpus(out_dir)))


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = WorldConfig()
    p = argparse.ArgumentParser(prog="python -m synthetic.world",
                                description="Generate the synthetic visual world (SYNTH-EVQA, "
                                            "SYNTH-EIC, SYNTH-VLKEB and a pretraining corpus).")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="data/synthetic", help="output folder (default data/synthetic)")
    p.add_argument("--n_train", type=int, default=d.n_train, help="train records per dataset")
    p.add_argument("--n_eval", type=int, default=d.n_eval, help="eval records per dataset")
    p.add_argument("--n_loc", type=int, default=d.n_loc, help="entities in the m_loc pool")
    p.add_argument("--pretrain_renders", type=int, default=d.pretrain_renders,
                   help="pretraining renders per entity")
    p.add_argument("--extra_entities", type=int, default=d.extra_entities,
                   help="non-dataset entities with pretraining renders (-1: all)")
    p.add_argument("--n_heldout_renders", type=int, default=d.n_heldout_renders,
                   help="dataset renders sampled into pretrain/heldout.json")
    p.add_argument("--image_size", type=int, default=d.image_size, help="image side in pixels")
    p.add_argument("--entities_per_signature", type=int, default=d.entities_per_signature,
                   help="entities per colour signature (shape colour, background, frame)")
    p.add_argument("--n_general", type=int, default=d.n_general,
                   help="questions of the general-capability VQA set")
    p.add_argument("--large_eval", type=int, default=0, metavar="N",
                   help="also write SYNTH-EVQA's large eval split of N records (split eval_large, e.g. 10000; "
                        "an addition that changes no file of the world: synthetic/large_eval.py)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--force", action="store_true", help="regenerate even if the world is complete")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse_args(argv)
    cfg = WorldConfig(seed=a.seed, n_train=a.n_train, n_eval=a.n_eval, n_loc=a.n_loc,
                      pretrain_renders=a.pretrain_renders, extra_entities=a.extra_entities,
                      n_heldout_renders=a.n_heldout_renders, image_size=a.image_size,
                      entities_per_signature=a.entities_per_signature, n_general=a.n_general)
    t0 = time.perf_counter()
    try:
        cfg.validate()
        if a.large_eval < 0:
            raise ValueError(f"--large_eval must be a positive number of records (0: none), got {a.large_eval}")
        existed = not a.force and is_complete(a.out, cfg)
        if existed:
            print(f"synthetic world already complete in {Path(a.out).absolute()}"
                  + ("" if a.large_eval else "; nothing to do"))
            out = Path(a.out).absolute()
        else:
            out = generate_world(a.out, cfg, workers=a.workers, progress=not a.quiet)
        if a.large_eval:
            from synthetic import large_eval
            large_eval.ensure(out, a.large_eval, workers=a.workers, progress=not a.quiet)
            lm = large_eval.read_manifest(out)
            print(f"{out / large_eval.RECORDS_FILE}: {lm['records']} records ({lm['distinct_facts']} distinct facts, "
                  f"{lm['re_edits']} re-edits); {time.perf_counter() - t0:.1f} s")
    except (ValueError, TypeError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if existed:
        return 0
    m = read_manifest(out)
    counts = ", ".join(f"{k} {v['records']}" for k, v in m["datasets"].items())
    print(f"{out}: {counts}; pretrain {m['pretrain']['train']['examples']} examples, heldout "
          f"{m['pretrain']['heldout']['examples']}; {m['images']['files']} image files; "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
