"""The demo's measured contrast: many held-out sentences streamed through a served model, in chunks of random
sizes over several connections, scored on the language word after "i speak fluent".

One story is one draw: a plain RNN trained at short gaps still carries some countries across a long gap (its
tanh units can latch), so for one sentence it may come up right by chance. Its accuracy over many sentences
is what the claim rests on. Sentences are made here, with their own random fillers and countries (a seed of
their own, none of training's), from the language task's word lists.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.cli.stream import encode_text
from serving.client import AsyncConveyorClient, ModelInfo, Outputs

SENTENCES = 300  # per gap and model
CONNECTIONS = 4
MAX_CHUNK_WORDS = 12
CONCURRENT_SESSIONS = 64
SEED = 20261207  # the held-out sentences' own generator


@dataclass(frozen=True)
class Sentence:
    """One question: the words up to "fluent", and the language word that should come next."""

    ids: np.ndarray  # int64 [words]
    answer: int  # the language word's id


@dataclass(frozen=True)
class GapAccuracy:
    """A model's language-word accuracy (argmax over the whole vocabulary) at the two gaps."""

    long_gap: float
    short_gap: float


def held_out_sentences(info: ModelInfo, filler_words: int, n: int, seed: int = SEED) -> list[Sentence]:
    """`n` sentences "i grew up in <country> . <filler_words random filler words> i speak fluent", each with
    a country drawn at random, in the model's vocabulary."""
    from training.tasks.words import COUNTRY_LANGUAGE, FILLER_WORDS  # word lists only: no torch

    rng = np.random.default_rng([seed, filler_words])
    vocabulary = info.vocabulary
    sentences = []
    for pair in rng.integers(len(COUNTRY_LANGUAGE), size=n):
        country, language = COUNTRY_LANGUAGE[pair]
        filler = " ".join(rng.choice(FILLER_WORDS, size=filler_words))
        text = f"i grew up in {country} . {filler} i speak fluent"
        sentences.append(Sentence(encode_text(text, vocabulary), vocabulary.index(language)))
    return sentences


def streamed_accuracy(target: str, sentences: Sequence[Sentence], seed: int = SEED) -> float:
    """The fraction of `sentences` whose next word the served model gets right, each streamed as its own
    session in chunks of 1-MAX_CHUNK_WORDS words, the sessions spread over CONNECTIONS connections."""
    return asyncio.run(_streamed_accuracy(target, sentences, np.random.default_rng(seed)))


async def _streamed_accuracy(target: str, sentences: Sequence[Sentence], rng: np.random.Generator) -> float:
    clients = [AsyncConveyorClient(target) for _ in range(CONNECTIONS)]
    room = asyncio.Semaphore(CONCURRENT_SESSIONS)
    try:
        hits = await asyncio.gather(
            *(
                _ask(clients[number % CONNECTIONS], sentence, _cuts(len(sentence.ids), rng), room)
                for number, sentence in enumerate(sentences)
            )
        )
    finally:
        for client in clients:
            await client.close()
    return float(np.mean(hits))


async def _ask(
    client: AsyncConveyorClient, sentence: Sentence, cuts: list[int], room: asyncio.Semaphore
) -> bool:
    async with room, client.session(outputs=Outputs.LAST) as session:
        for start, stop in itertools.pairwise(cuts):
            logits = await session.send(sentence.ids[start:stop], end=stop == len(sentence.ids))
    return int(np.argmax(logits[-1])) == sentence.answer


def _cuts(length: int, rng: np.random.Generator) -> list[int]:
    """Chunk boundaries 0 = b0 < b1 < ... = length, pieces of 1-MAX_CHUNK_WORDS words."""
    sizes = rng.integers(1, MAX_CHUNK_WORDS, size=length, endpoint=True)
    inner = np.cumsum(sizes)
    return [0, *inner[inner < length].tolist(), length]
