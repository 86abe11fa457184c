"""General-domain text for the demo: short everyday stories from a small random grammar.

Everything is generated from word lists written here with a seeded `random.Random`, so the corpus is
deterministic, free of copyrighted text, and varied enough (hundreds of thousands of sentence shapes over
a few hundred words) to train a tokenizer and to measure perplexity on held-out records.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "the farmer", "my neighbour", "a young painter", "the old sailor", "our teacher", "the children",
    "a small dog", "the city council", "a tired traveller", "the baker", "her brother", "the orchestra",
    "a quiet student", "the gardener", "the engineer", "the nurse", "his grandmother", "the football team",
    "a curious cat", "the librarian", "two fishermen", "the mayor", "a lost tourist", "the village doctor",
]
_TRANSITIVE = [
    "painted", "carried", "found", "cooked", "repaired", "watched", "described", "planted", "visited",
    "cleaned", "built", "followed", "collected", "opened", "measured", "borrowed", "forgot", "shared",
    "wrapped", "noticed",
]
_OBJECTS = [
    "a wooden boat", "the blue door", "fresh bread", "an old map", "the garden wall", "a long letter",
    "three apples", "the broken clock", "a warm coat", "the mountain path", "a basket of eggs", "the red kite",
    "a heavy box", "the kitchen window", "a strange stone", "the school bell", "a pair of boots", "the old piano",
    "a jar of honey", "the narrow bridge",
]
_INTRANSITIVE = [
    "slept", "sang", "waited", "laughed", "walked slowly", "worked late", "rested", "danced", "wandered",
    "stayed quiet", "ran home", "sat down",
]
_PLACES = [
    "near the harbour", "in the kitchen", "behind the school", "at the market", "on the hill", "by the lake",
    "in the forest", "under the bridge", "at the station", "in the library", "on the beach", "in the village square",
    "beside the church", "at the farm",
]
_TIMES = [
    "before sunrise", "after lunch", "last winter", "on Sunday", "every morning", "during the storm",
    "at midnight", "in early spring", "yesterday", "once a week", "in the evening", "after the rain",
]
_WEATHER = ["cold", "bright", "windy", "grey", "warm", "foggy", "wet", "calm"]
_FEELINGS = ["happy", "worried", "surprised", "sleepy", "proud", "hungry", "careful", "cheerful"]
_COLOURS = ["orange", "silver", "dark blue", "pale green", "purple", "golden"]
_REASONS = [
    "the road was closed", "the bus was late", "the shop had no milk", "a friend needed help",
    "the lights went out", "the river was too high", "the music was loud", "the door was locked",
]


def _sentence(rng: random.Random) -> str:
    """One sentence from one of several shapes, capitalised and ending in a full stop."""
    subj = rng.choice(_SUBJECTS)
    shape = rng.randrange(6)
    if shape == 0:
        text = f"{subj} {rng.choice(_TRANSITIVE)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)}"
    elif shape == 1:
        text = f"{subj} {rng.choice(_INTRANSITIVE)} {rng.choice(_PLACES)} because {rng.choice(_REASONS)}"
    elif shape == 2:
        text = f"the weather was {rng.choice(_WEATHER)} and the sky turned {rng.choice(_COLOURS)} {rng.choice(_TIMES)}"
    elif shape == 3:
        text = f"{subj} felt {rng.choice(_FEELINGS)} when {rng.choice(_SUBJECTS)} {rng.choice(_TRANSITIVE)} {rng.choice(_OBJECTS)}"
    elif shape == 4:
        text = f"{rng.choice(_TIMES)} {subj} {rng.choice(_INTRANSITIVE)} while {rng.choice(_SUBJECTS)} {rng.choice(_INTRANSITIVE)}"
    else:
        text = f"{subj} {rng.choice(_TRANSITIVE)} {rng.choice(_OBJECTS)}, so {rng.choice(_SUBJECTS)} felt {rng.choice(_FEELINGS)}"
    return text[0].upper() + text[1:] + "."


def general_texts(n: int, seed: int) -> list[str]:
    """`n` distinct short stories of 1 to 3 sentences each, deterministic for a given `seed`."""
    rng = random.Random(seed)
    # Distinct records, so that a held-out slice never repeats a training record word for word.
    stories: dict[str, None] = {}
    while len(stories) < n:
        stories[" ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))] = None
    return list(stories)
