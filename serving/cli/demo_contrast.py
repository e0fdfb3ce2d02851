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
from serving.client import AsyncConveyorClient, ClientOptions, ModelInfo, Outputs

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


# Everyday sentences made of filler words, which training never generates (its fillers are drawn word by word,
# in bursts or in short loops): a filler of this kind is these sentences in a random order.
PHRASES = (
    "we went to the market every morning",
    "my brother taught music to children from the city school",
    "the train was late because of the snow",
    "she cooked soup for the family every evening",
    "they walked near the river after the rain",
    "our neighbour painted his house blue",
    "the children played with the dog every weekend",
    "he wrote a long letter to his aunt",
    "we visited the museum one cold winter day",
    "my father fixed the old car behind the house",
    "the cat stayed near the door all night",
    "she bought bread and cheese from the shop",
)
# Filler kinds no training filler is: "uniform" is training's own (the demo's story), the rest are not.
FILLER_KINDS = ("uniform", "phrases", "skewed", "long_loop", "one_word")


def held_out_sentences(
    info: ModelInfo,
    filler_words: int,
    n: int,
    seed: int = SEED,
    kind: str = "uniform",
    before: bool = False,
) -> list[Sentence]:
    """`n` sentences "i grew up in <country> . <filler_words filler words> i speak fluent", each with a
    country drawn at random, in the model's vocabulary. `kind` (FILLER_KINDS): the filler's words drawn
    uniformly, everyday sentences (PHRASES), words of skewed (Zipf) frequencies, a loop of 20-40 words, or one
    word throughout. `before`: after a whole sentence with another country, which must be overwritten."""
    from training.tasks.words import COUNTRY_LANGUAGE  # word lists only

    rng = np.random.default_rng([seed, filler_words, FILLER_KINDS.index(kind), before])
    vocabulary = info.vocabulary
    sentences = []
    for pair in rng.integers(len(COUNTRY_LANGUAGE), size=n):
        country, language = COUNTRY_LANGUAGE[pair]
        text = f"i grew up in {country} . {_filler(kind, filler_words, rng)} i speak fluent"
        if before:
            shift = int(rng.integers(1, len(COUNTRY_LANGUAGE)))
            other, said = COUNTRY_LANGUAGE[(pair + shift) % len(COUNTRY_LANGUAGE)]
            first = f"i grew up in {other} . {_filler(kind, filler_words, rng)} i speak fluent {said} ."
            text = f"{first} {text}"
        sentences.append(Sentence(encode_text(text, vocabulary), vocabulary.index(language)))
    return sentences


def _filler(kind: str, words: int, rng: np.random.Generator) -> str:
    from training.tasks.words import FILLER_WORDS

    if kind == "uniform":
        chosen = rng.choice(FILLER_WORDS, size=words).tolist()
    elif kind == "phrases":
        chosen = []
        while len(chosen) < words:
            chosen += PHRASES[rng.integers(len(PHRASES))].split()
    elif kind == "skewed":  # the k-th most frequent word k times as frequent as the first
        weights = 1 / np.arange(1, len(FILLER_WORDS) + 1)
        order = rng.permutation(len(FILLER_WORDS))
        chosen = [
            FILLER_WORDS[order[i]]
            for i in rng.choice(len(FILLER_WORDS), size=words, p=weights / weights.sum())
        ]
    elif kind == "long_loop":
        chosen = np.resize(rng.choice(FILLER_WORDS, size=int(rng.integers(20, 41))), words).tolist()
    elif kind == "one_word":
        chosen = [FILLER_WORDS[rng.integers(len(FILLER_WORDS))]] * words
    else:
        raise ValueError(f"unknown filler kind {kind!r}: one of {FILLER_KINDS}")
    return " ".join(chosen[:words])


def streamed_accuracy(
    target: str,
    sentences: Sequence[Sentence],
    seed: int = SEED,
    most_words: int = MAX_CHUNK_WORDS,
    model: str = "",
) -> float:
    """The fraction of `sentences` whose next word the served `model` gets right ("": the server's only one),
    each streamed as its own session in chunks of 1-`most_words` words, the sessions spread over CONNECTIONS
    connections."""
    options = ClientOptions(model=model)
    return asyncio.run(
        _streamed_accuracy(target, options, sentences, np.random.default_rng(seed), most_words)
    )


async def _streamed_accuracy(
    target: str,
    options: ClientOptions,
    sentences: Sequence[Sentence],
    rng: np.random.Generator,
    most_words: int,
) -> float:
    clients = [AsyncConveyorClient(target, options) for _ in range(CONNECTIONS)]
    room = asyncio.Semaphore(CONCURRENT_SESSIONS)
    try:
        hits = await asyncio.gather(
            *(
                _ask(clients[number % CONNECTIONS], sentence, _cuts(len(sentence.ids), rng, most_words), room)
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


def _cuts(length: int, rng: np.random.Generator, most_words: int) -> list[int]:
    """Chunk boundaries 0 = b0 < b1 < ... = length, pieces of 1-`most_words` words."""
    sizes = rng.integers(1, most_words, size=length, endpoint=True)
    inner = np.cumsum(sizes)
    return [0, *inner[inner < length].tolist(), length]
