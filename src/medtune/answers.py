"""Generated answers -> class labels, and the classification metrics of a set of answers.

Parsing is deliberately conservative: an answer counts as a label only when it mentions that label (its name or a
synonym, as whole words, the longest phrase winning where two overlap); with several labels mentioned the first one
counts; a mention preceded by a negation ("not malignant") does not count. An answer that names no label is an
"invalid answer": counted and reported, scored as wrong, never mapped to a guess.
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
_NEGATION = re.compile(r"(?:\bnot|\bno|\bnon|\bisn't|\bnever|\bwithout)[\s-]+$")


@dataclass
class ParsedAnswer:
    label: str | None  # None = invalid answer
    mentioned: list[str] = field(default_factory=list)  # distinct labels mentioned (not negated), in order


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


def parse_answer(text: str, vocab: Mapping[str, str]) -> ParsedAnswer:
    lowered = " ".join(text.lower().split())
    mentioned: list[str] = []
    for match in _pattern(vocab).finditer(lowered):
        if _NEGATION.search(lowered[:match.start()]):
            continue
        label = vocab[" ".join(match.group(0).split())]
        if label not in mentioned:
            mentioned.append(label)
    return ParsedAnswer(label=mentioned[0] if mentioned else None, mentioned=mentioned)


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
