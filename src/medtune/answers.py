"""Generated answers -> class labels, and the classification metrics of a set of answers.

Parsing is deliberately conservative. A label is *mentioned* where its name or a synonym occurs as whole words (the
longest phrase winning where two overlap; a configured phrase wins over a trigger word, so "not cancerous" is benign
and "no" may be a label). Each mention is then read in its context, NegEx-style (Chapman et al. 2001; ConText,
Harkema et al. 2009): trigger phrases negate ("no", "not", "without", "negative for", "rather than", "... is ruled
out", "... unlikely") or make uncertain ("possible", "may be", "cannot rule out", "... cannot be excluded",
"indeterminate", "versus") the mentions in their scope (``TRIGGERS``). A trigger before the mentions it governs ("no
malignancy") reaches forward, one after them ("malignancy is ruled out") backward, "unlikely" and "ruled out"
whichever way a mention lies (forward first), "versus" both ways. A scope ends at a terminator (sentence or clause
punctuation ``. ; : ! ? ( )``, a dash, "but", "however", "although", "except", "rather", ...), at the next trigger,
after ``SCOPE_WORDS`` words, and at a comma once it has covered a mention ("no malignant features, benign": the comma
starts a new clause; "no calcifications, masses or malignancy": a list of negated findings). Pseudo-triggers that
contain a trigger word but negate nothing ("no change", "no increase", "not only", "no doubt") are skipped.

The answer's label is the one label mentioned affirmatively, that is neither negated nor uncertain:
- committed, counted: a plain statement ("Malignant.", "The lesion appears benign."), and hedges that still commit
  to one label as the most likely, the radiology lexicon's higher-confidence phrases: "likely", "probably", "most
  likely", "consistent with", "compatible with", "suggestive of", "suspicious for", "concerning for", "favour".
  A negated or uncertain mention of another label does not take the commitment away ("Cannot rule out malignancy;
  probably benign." -> benign);
- uncertain, invalid: a mention only under an uncertainty trigger (lower-confidence phrases that leave the question
  open: "possible", "possibly", "may", "might", "could", "cannot rule out / exclude", "indeterminate", "equivocal",
  "questionable", "unclear", "versus", "either", "differential"): "Cannot rule out malignancy." is not "malignant";
- several labels mentioned affirmatively ("benign or malignant", "benign and malignant"): a hedge or a
  contradiction, invalid, never the first one named;
- no label, or only negated ones ("not malignant", "negative for malignancy"): invalid; a negation is never turned
  into the other label.
An invalid answer is counted and reported, scored as wrong, never mapped to a guess.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medtune.stats import bootstrap_ci

INVALID = "invalid answer"
# Built-in synonyms for common medical labels; task.synonyms adds to them (and may cover any label set).
DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "benign": ("non-cancerous", "noncancerous", "not cancerous", "non-malignant", "nonmalignant"),
    "malignant": ("cancerous", "cancer", "malignancy", "carcinoma"),
    "normal": ("healthy", "no lesion", "no abnormality", "unremarkable"),
}

# ---- context triggers (regular expressions over the lower-cased answer, whole words) ------------------------------
SCOPE_WORDS = 5  # words a trigger reaches past itself to a mention (NegEx's window)
NEG, UNCERTAIN, PSEUDO, END = "negated", "uncertain", "pseudo", "end"
PRE, POST, EITHER, AROUND = "pre", "post", "either", "around"  # forward, backward, forward else backward, both ways
_CANNOT = r"(?:cannot|can ?not|can't|could ?not|couldn't|unable to)"
_IS = r"(?:is|are|was|were|has been|have been|be|been|seems?|appears?|remains?)"
_NOT_FOUND = ("not seen", "not identified", "not present", "not detected", "not demonstrated", "not found",
              "not evident", "not visualized")
# (phrases, kind, direction); each phrase a regular expression over whole words, the longest match winning
TRIGGERS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("no", "not", "none", "never", "without", "neither", "nor", "non", r"\w+n't", "cannot", "cannot be", "lacks?",
      "lack of", "absence of", "free of", "negative for", "rather than", "instead of", "excludes?", "rules out",
      "no evidence of", r"no signs? of"), NEG, PRE),
    ((*_NOT_FOUND, "excluded", "absent", rf"{_IS} (?:{'|'.join(_NOT_FOUND)}|absent|excluded|negative|unlikely)"),
     NEG, POST),
    ((r"unlikely(?: to be)?", "ruled out"), NEG, EITHER),
    (("possible", "possibly", "perhaps", "maybe", r"may(?: be| represent)?", r"might(?: be| represent)?",
      r"could(?: be| represent)?", "can be", "questionable", "question of", "equivocal", "indeterminate", "uncertain",
      "unclear", "undetermined", "not sure", "unsure", "not certain", "not clear", "either", "whether",
      r"differential(?: diagnosis)?(?: includes?)?", "rule out", "r/o", "to exclude", "evaluate for",
      rf"{_CANNOT} (?:rule out|exclude|tell|say|determine|be determined|be certain)",
      r"(?:difficult|hard|impossible) to (?:tell|say|determine|assess|distinguish)"), UNCERTAIN, PRE),
    ((rf"{_CANNOT} be (?:ruled out|excluded)", rf"(?:{_IS} )?not (?:be )?(?:ruled out|excluded)",
      rf"{_IS} (?:possible|uncertain|unclear|questionable|equivocal|indeterminate|a possibility|not certain)"),
     UNCERTAIN, POST),
    ((r"versus", r"vs\.?"), UNCERTAIN, AROUND),
    # contain a trigger word, negate nothing
    ((r"no (?:significant |definite |suspicious |interval |further )?(?:change|increase|growth)", "no further",
      "not only", "not necessarily", "no doubt", "without doubt", "not unlike", "not exclusively"), PSEUDO, PRE),
)
# end every scope: clause conjunctions, and sentence / clause punctuation (a period not inside a number, a spaced dash)
END_WORDS = ("but", "however", "although", "though", "yet", "except", "apart from", "aside from", "whereas", "while",
             "rather", "instead", "otherwise")
END_MARKS = r"\.(?!\d)|[;:!?()\u2014]| - "
_WORD = re.compile(r"[\w'/]+")


@dataclass
class ParsedAnswer:
    label: str | None  # None = invalid answer: no label, only negated / uncertain ones, or several
    mentioned: list[str] = field(default_factory=list)  # distinct labels mentioned affirmatively, in order
    uncertain: list[str] = field(default_factory=list)  # distinct labels mentioned only under an uncertainty trigger


def answer_vocabulary(labels: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """{lower-case phrase: label}: each label, its built-in synonyms and the configured ones."""
    extra = synonyms or {}
    unknown = sorted(set(extra) - set(labels))
    if unknown:
        raise ValueError(f"task.synonyms names {unknown}, which are not in task.labels {list(labels)}")

    def key(phrase: str) -> str:
        return " ".join(phrase.lower().split())

    vocab: dict[str, str] = {key(label): label for label in labels}
    for label in labels:
        for phrase in DEFAULT_SYNONYMS.get(label.lower(), ()):
            vocab.setdefault(key(phrase), label)  # a built-in synonym yields to another label's own name
        for phrase in extra.get(label, ()):
            if vocab.get(key(phrase), label) != label and key(phrase) not in DEFAULT_SYNONYMS.get(label.lower(), ()):
                raise ValueError(f"task.synonyms: {phrase!r} would mean both {vocab[key(phrase)]!r} and {label!r}")
            vocab[key(phrase)] = label
    return vocab


def _pattern(vocab: Mapping[str, str]) -> re.Pattern:
    phrases = sorted(vocab, key=len, reverse=True)  # longest first: "non-cancerous" before "cancerous"
    return re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in phrases) + r")(?!\w)")


def _words(pattern: str) -> re.Pattern:
    """Whole words only: a trigger never starts or ends inside a word ("no" in "nodule", "not" in "cannot")."""
    return re.compile(r"(?<![\w-])(?:" + pattern + r")(?![\w-])")


_CONTEXT = (tuple((_words(p), kind, direction) for phrases, kind, direction in (*TRIGGERS, (END_WORDS, END, PRE))
                  for p in phrases)
            + ((re.compile(END_MARKS), END, PRE), (re.compile(","), "comma", PRE)))


@dataclass
class _Span:
    start: int
    end: int
    kind: str  # a trigger kind, "label" or "comma"
    direction: str = PRE
    label: str | None = None


def _spans(text: str, vocab: Mapping[str, str]) -> list[_Span]:
    """Label mentions, then triggers, terminators and commas where no label lies, in text order. A configured phrase
    wins over a trigger ("not cancerous" is benign, "no" may be a label); among triggers the longer one ("cannot rule
    out" over "cannot", "no change" over "no")."""
    kept = [_Span(m.start(), m.end(), "label", label=vocab[" ".join(m.group(0).split())])
            for m in _pattern(vocab).finditer(text)]
    taken = np.zeros(len(text) + 1, dtype=bool)
    for span in kept:
        taken[span.start:span.end] = True
    found = [_Span(m.start(), m.end(), kind, direction) for regex, kind, direction in _CONTEXT
             for m in regex.finditer(text)]
    for span in sorted(found, key=lambda s: (s.start - s.end, s.start)):
        if not taken[span.start:span.end].any():
            taken[span.start:span.end] = True
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


def _scope(spans: list[_Span], i: int, step: int, text: str) -> list[int]:
    """Indices of the label mentions that trigger ``spans[i]`` governs, walking forward (step 1) or backward (-1)."""
    trigger, covered = spans[i], []
    j = i + step
    while 0 <= j < len(spans):
        span = spans[j]
        if span.kind in (END, NEG, UNCERTAIN):  # a terminator, or another trigger with its own scope
            break
        if span.kind == "comma" and covered:
            break
        if span.kind == "label":
            gap = text[trigger.end:span.start] if step > 0 else text[span.end:trigger.start]
            if len(_WORD.findall(gap)) > SCOPE_WORDS:
                break
            covered.append(j)
        j += step
    return covered


def parse_answer(text: str, vocab: Mapping[str, str]) -> ParsedAnswer:
    """The label an answer commits to (see the module docstring), or None (an invalid answer)."""
    lowered = " ".join(text.lower().replace("\u2019", "'").split())  # typographic apostrophes: "isn\u2019t"
    spans = _spans(lowered, vocab)
    context: dict[int, set[str]] = {}
    for i, span in enumerate(spans):
        if span.kind not in (NEG, UNCERTAIN):
            continue
        if span.direction == EITHER:
            covered = _scope(spans, i, 1, lowered) or _scope(spans, i, -1, lowered)
        elif span.direction == AROUND:
            covered = _scope(spans, i, 1, lowered) + _scope(spans, i, -1, lowered)
        else:
            covered = _scope(spans, i, 1 if span.direction == PRE else -1, lowered)
        for j in covered:
            context.setdefault(j, set()).add(span.kind)
    mentioned: list[str] = []
    uncertain: list[str] = []
    for j, span in enumerate(spans):
        if span.kind != "label":
            continue
        kinds = context.get(j, set())
        target = mentioned if not kinds else uncertain if kinds == {UNCERTAIN} else None
        if target is not None and span.label not in target:
            target.append(span.label)
    uncertain = [label for label in uncertain if label not in mentioned]
    return ParsedAnswer(label=mentioned[0] if len(mentioned) == 1 else None, mentioned=mentioned,
                        uncertain=uncertain)


def confusion(refs: Sequence[str], preds: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """[K, K + 1] counts: rows = reference label, columns = predicted label, the last column = invalid answers."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
    for r, p in zip(refs, preds):
        out[index[r], index[p] if p is not None else len(labels)] += 1
    return out


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """precision, recall, F1 per class from a [..., K, K + 1] confusion (NaN where undefined: no prediction of the
    class for precision, no reference of it for recall)."""
    k = matrix.shape[-2]
    tp = np.diagonal(matrix[..., :k], axis1=-2, axis2=-1).astype(np.float64)
    predicted = matrix[..., :k].sum(axis=-2).astype(np.float64)  # invalid answers predict no class
    actual = matrix.sum(axis=-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(actual > 0, tp / actual, np.nan)
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), np.nan)
    return precision, recall, f1


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def classification_metrics(refs: Sequence[str], preds: Sequence[str | None], labels: Sequence[str],
                           n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                           majority_label: str | None = None) -> dict:
    """Accuracy (invalid answers count as wrong), macro-F1, per-class precision / recall / F1 with percentile-
    bootstrap CIs over samples, the confusion matrix and the invalid-answer count.

    ``majority_label`` (e.g. the training set's most frequent class): the accuracy of always answering it, the
    baseline every accuracy should be read against."""
    labels = list(labels)
    refs, preds = list(refs), list(preds)
    n = len(refs)
    matrix = confusion(refs, preds, labels)
    correct = np.array([p == r for r, p in zip(refs, preds)], dtype=np.float64)
    precision, recall, f1 = _per_class(matrix)
    out: dict = {
        "n": n, "labels": labels, "n_invalid": int(sum(p is None for p in preds)),
        "accuracy": bootstrap_ci(correct, n_boot=n_boot, alpha=alpha, seed=seed) if n else
        {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "n_nan": 0},
        "confusion": {"rows": labels, "columns": labels + [INVALID], "counts": matrix.tolist()},
    }
    macro = float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")
    # one set of resamples for every class metric, so their intervals come from the same draws
    rng = np.random.default_rng(seed)
    ref_idx = np.array([labels.index(r) for r in refs], dtype=np.int64)
    pred_idx = np.array([labels.index(p) if p is not None else len(labels) for p in preds], dtype=np.int64)
    boot_p = boot_r = boot_f = np.full((0, len(labels)), np.nan)
    if n > 1:
        draws = rng.integers(0, n, size=(n_boot, n))
        flat = ref_idx[draws] * (len(labels) + 1) + pred_idx[draws]
        counts = np.stack([np.bincount(row, minlength=len(labels) * (len(labels) + 1)) for row in flat])
        boot_p, boot_r, boot_f = _per_class(counts.reshape(n_boot, len(labels), len(labels) + 1))
    with np.errstate(invalid="ignore"):
        boot_macro = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in boot_f])
    out["macro_f1"] = {"mean": macro, **dict(zip(("lo", "hi"), _interval(boot_macro, alpha) if n > 1 else (macro,
                                                                                                          macro)))}
    out["per_class"] = {}
    for k, label in enumerate(labels):
        entry = {"support": int(matrix[k].sum())}
        for name, point, boots in (("precision", precision, boot_p), ("recall", recall, boot_r), ("f1", f1, boot_f)):
            lo, hi = _interval(boots[:, k], alpha) if n > 1 else (float(point[k]), float(point[k]))
            entry[name] = {"mean": float(point[k]), "lo": lo, "hi": hi}
        out["per_class"][label] = entry
    if majority_label is not None:
        out["majority_label"] = majority_label
        out["majority_rate"] = float(np.mean([r == majority_label for r in refs])) if n else float("nan")
    return out


def format_classification(m: dict) -> list[str]:
    acc = m["accuracy"]
    lines = [f"  accuracy {acc['mean']:.4f}  95% CI [{acc['lo']:.4f}, {acc['hi']:.4f}]  (n {m['n']}, invalid "
             f"answers {m['n_invalid']})"]
    if "majority_rate" in m:
        lines.append(f"  majority class '{m['majority_label']}' always: {m['majority_rate']:.4f}")
    lines.append(f"  macro-F1 {m['macro_f1']['mean']:.4f}  95% CI [{m['macro_f1']['lo']:.4f}, {m['macro_f1']['hi']:.4f}]")
    for label, c in m["per_class"].items():
        lines.append(f"    {label:<12} precision {c['precision']['mean']:.3f}  recall {c['recall']['mean']:.3f}  "
                     f"F1 {c['f1']['mean']:.3f}  (support {c['support']})")
    cols = m["confusion"]["columns"]
    lines.append("  confusion (rows: reference, columns: answer): " + " | ".join(cols))
    for label, row in zip(m["confusion"]["rows"], m["confusion"]["counts"]):
        lines.append(f"    {label:<12} " + "  ".join(f"{v:>5d}" for v in row))
    return lines


# ---- rewards for sampled answers (GRPO) -------------------------------------------------------------------------------
ANSWER_REWARDS = ("correct", "format")
ANSWER_PRESETS: dict[str, dict[str, float]] = {
    "answer": {"correct": 1.0, "format": 0.25},
    "correct": {"correct": 1.0},
}


def resolve_answer_weights(reward: str | dict[str, float]) -> dict[str, float]:
    """``rl.reward`` for answers: a preset name or {component: weight} over ``ANSWER_REWARDS``."""
    if isinstance(reward, str):
        if reward not in ANSWER_PRESETS:
            raise ValueError(f"rl.reward {reward!r} is not an answer reward preset; for task instruct use one of "
                             f"{sorted(ANSWER_PRESETS)} or {{component: weight}} over {list(ANSWER_REWARDS)}")
        return dict(ANSWER_PRESETS[reward])
    unknown = sorted(set(reward) - set(ANSWER_REWARDS))
    if unknown or not reward:
        raise ValueError(f"rl.reward components {unknown or '{}'} unknown; for task instruct use {list(ANSWER_REWARDS)}")
    return dict(reward)


def answer_rewards(answers: Sequence[str], finished: Sequence[bool], references: Sequence[str | None],
                   vocab: Mapping[str, str], weights: Mapping[str, float]) -> tuple[list[float], dict[str, list[float]]]:
    """Reward of each sampled answer: ``correct`` = 1 when its parsed label is the reference label; ``format`` = 1
    when it finished (a stop token before max_new_tokens) and names exactly one label. Returns (weighted totals,
    {component: values})."""
    components: dict[str, list[float]] = {k: [] for k in weights}
    for answer, done, ref in zip(answers, finished, references):
        parsed = parse_answer(answer, vocab)
        values = {"correct": float(ref is not None and parsed.label == ref),
                  "format": float(bool(done) and len(parsed.mentioned) == 1)}
        for k in weights:
            components[k].append(values[k])
    totals = [sum(weights[k] * components[k][i] for k in weights) for i in range(len(answers))]
    return totals, components
