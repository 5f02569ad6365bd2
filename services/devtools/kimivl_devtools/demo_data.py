"""Synthetic pictures and questions for the tiny demo model, with answers in Kimi's format.

A picture is either 1-4 shapes of one kind and colour (circle, square, triangle) at random places
on white, or a word from a short list written in one colour near the centre. Every question gets a short thinking segment that
describes the picture, then an answer that depends on the picture and the question:

    ◁think▷I see 3 blue triangles.◁/think▷There are 3 triangles.

Everything is a function of the seed, so training data (and the pictures ``make run`` shows)
can be regenerated exactly. Rendering uses Pillow only (the word in Pillow's built-in FreeType
font, Aileron, at one size: reading it from 14-pixel patches is learned in minutes only when
the word is nearly where and as large as it always is).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SIZE = 112  # pixels: an 8x8 patch grid, 16 image tokens
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "DOG", "SUN", "FISH", "TREE", "STAR")  # each at most 90 px wide at FONT_SIZE
FONT_SIZE = 36
WORD_SHARE = 1 / 3  # of the pictures
GAP = 10  # pixels at least between two shapes: counting touching shapes is what takes longest to learn

COUNT_QUESTIONS = ("How many shapes are there?", "How many are there?", "Count the shapes.")
COLOUR_QUESTIONS = ("What colour are they?", "What color is it?", "Which colour do you see?")
SHAPE_QUESTIONS = ("What shape is this?", "What shapes do you see?", "Which shape is it?")
READ_QUESTIONS = ("What does it say?", "Read the text.", "What word is written?")
DESCRIBE_QUESTIONS = ("Describe this picture.", "What is in this picture?", "What do you see?")


@dataclass(frozen=True)
class Scene:
    kind: str  # "shapes" or "word"
    colour: str
    shape: str = ""
    count: int = 0
    word: str = ""

    def thinking(self) -> str:
        if self.kind == "word":
            return f"I see the word {self.word} written in {self.colour}."
        return f"I see {self.count} {self.colour} {self._shape_noun()}."

    def _shape_noun(self) -> str:
        return self.shape if self.count == 1 else self.shape + "s"

    def answer(self, question: str) -> str:
        if question in COUNT_QUESTIONS:
            if self.kind == "word":
                return f"There is 1 word: {self.word}."
            return f"There is 1 {self.shape}." if self.count == 1 else f"There are {self.count} {self.shape}s."
        if question in COLOUR_QUESTIONS:
            return f"It is {self.colour}." if self.kind == "word" or self.count == 1 else f"They are {self.colour}."
        if question in SHAPE_QUESTIONS:
            return f"It is the word {self.word}." if self.kind == "word" else f"{self._shape_noun().capitalize()}."
        if question in READ_QUESTIONS:
            return f"It says {self.word}." if self.kind == "word" else "There is no text, only shapes."
        if self.kind == "word":
            return f"The word {self.word} in {self.colour} letters."
        return f"{self.count} {self.colour} {self._shape_noun()} on a white background."

    def questions(self) -> tuple[str, ...]:
        return COUNT_QUESTIONS + COLOUR_QUESTIONS + SHAPE_QUESTIONS + READ_QUESTIONS + DESCRIBE_QUESTIONS


def random_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    if rng.random() < WORD_SHARE:
        return Scene("word", colour, word=rng.choice(WORDS))
    return Scene("shapes", colour, shape=rng.choice(SHAPES), count=rng.randint(1, 4))


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene drawn at SIZE x SIZE: shapes at random places without overlap, or the word
    centred, a few pixels off at random."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    if scene.kind == "word":
        font = ImageFont.load_default(size=FONT_SIZE)
        left, top, right, bottom = d.textbbox((0, 0), scene.word, font=font)
        x = (SIZE - (right - left)) // 2 - left + rng.randint(-4, 4)
        y = (SIZE - (bottom - top)) // 2 - top + rng.randint(-4, 4)
        d.text((x, y), scene.word, fill=fill, font=font)
        return img
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < scene.count:
        r = rng.randint(13, 17)
        cx, cy = rng.randint(r + 2, SIZE - r - 3), rng.randint(r + 2, SIZE - r - 3)
        if all((cx - bx) ** 2 + (cy - by) ** 2 > (r + br + GAP) ** 2 for bx, by, br in boxes):
            boxes.append((cx, cy, r))
    for cx, cy, r in boxes:
        if scene.shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif scene.shape == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def example(rng: random.Random) -> tuple[Image.Image, Scene, str]:
    """(picture, scene, question), all drawn from rng."""
    scene = random_scene(rng)
    return render(scene, rng), scene, rng.choice(scene.questions())
