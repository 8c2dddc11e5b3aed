"""Answer parsing, classification metrics and McNemar's test, against hand-computed values."""
from __future__ import annotations

import math

import pytest

from medtune.answers import SCOPE_WORDS, answer_vocabulary, classification_metrics, parse_answer
from medtune.stats import mcnemar

LABELS = ["benign", "malignant", "normal"]
VOCAB = answer_vocabulary(LABELS)


@pytest.mark.parametrize("text, label", [
    ("benign", "benign"),
    ("Benign.", "benign"),
    ("Malignant.", "malignant"),
    ("The lesion appears MALIGNANT", "malignant"),
    ("The lesion appears benign.", "benign"),
    ("malignant-looking mass", "malignant"),
    ("It is non-cancerous.", "benign"),  # the longer phrase wins over "cancerous"
    ("not cancerous", "benign"),  # ... and a configured phrase over the trigger "not"
    ("Findings consistent with cancer", "malignant"),
    ("healthy tissue", "normal"),
    ("There is no lesion.", "normal"),
    ("I cannot tell", None),
    ("benignity", None),  # whole words only
    ("", None),
    # hedged but committed to one label: counted
    ("likely benign", "benign"),
    ("Probably benign (BI-RADS 3).", "benign"),
    ("suspicious for malignancy", "malignant"),
    ("Highly suggestive of malignancy.", "malignant"),
    ("Findings are consistent with a benign fibroadenoma.", "benign"),
    ("No doubt malignant.", "malignant"),  # pseudo-negation
    ("Possibly malignant, but most likely benign.", "benign"),  # "but" ends the uncertainty's scope
    ("Cannot rule out malignancy; probably benign.", "benign"),
    # several labels named: a hedge or a contradiction, invalid (never the first one)
    ("benign or malignant", None),
    ("either benign or malignant", None),
    ("benign vs. malignant", None),
    ("benign and malignant components", None),
    # uncertain: invalid, not the label named
    ("Cannot rule out malignancy.", None),
    ("Malignancy cannot be excluded.", None),
    ("Malignancy is not excluded.", None),
    ("possibly malignant", None),
    ("may be benign", None),
    ("Indeterminate; could be malignant.", None),
    # negated: never counted, never turned into the other label
    ("not malignant", None),
    ("negative for malignancy", None),
    ("No evidence of malignancy.", None),
    ("Malignancy unlikely.", None),  # post-negation
    ("Malignancy is unlikely given the smooth margins.", None),
    ("Malignancy has been ruled out.", None),
    ("No calcifications, masses or malignancy.", None),  # a comma before any mention continues the list
    # negation scopes end where the next clause starts
    ("No evidence of malignancy; benign.", "benign"),
    ("Neither benign nor malignant: normal tissue.", "normal"),
    ("no malignant features, benign", "benign"),
    ("not malignant, rather benign", "benign"),
    ("Not malignant but benign.", "benign"),
    ("It isn\u2019t malignant; it\u2019s benign.", "benign"),
    ("It isn't benign.", None),
    ("benign rather than malignant", "benign"),
    ("Benign, unlikely to be malignant.", "benign"),
    ("The lesion is not benign; it is malignant.", "malignant"),
    ("Malignant features absent; benign.", "benign"),
    ("Negative for malignancy. Benign.", "benign"),
    ("No interval change in this benign-appearing nodule.", "benign"),  # pseudo-negation: "no interval change"
    ("No increase in size, consistent with a benign cyst.", "benign"),
    ("Malignant, possibly metastatic.", "malignant"),  # a trigger reaches forward only
])
def test_parse_answer(text, label):
    assert parse_answer(text, VOCAB).label == label


def test_negation_scope_is_a_window_of_words():
    # a trigger reaches SCOPE_WORDS words past itself (NegEx's window); further on, the mention stands
    assert SCOPE_WORDS == 5
    assert parse_answer("no mass seen and the lesion is benign", VOCAB).label == "benign"  # 6 words between
    assert parse_answer("no sonographic features to suggest malignancy", VOCAB).label is None  # 4 words between


def test_uncertain_mentions_are_reported_apart():
    parsed = parse_answer("Cannot rule out malignancy.", VOCAB)
    assert (parsed.label, parsed.mentioned, parsed.uncertain) == (None, [], ["malignant"])
    parsed = parse_answer("Possibly malignant, but most likely benign.", VOCAB)
    assert (parsed.label, parsed.mentioned, parsed.uncertain) == ("benign", ["benign"], ["malignant"])


def test_labels_that_are_trigger_words():
    """A yes/no label set: the configured "no" is a label, not a negation."""
    vocab = answer_vocabulary(["yes", "no"])
    assert parse_answer("No.", vocab).label == "no"
    assert parse_answer("Yes, it is.", vocab).label == "yes"
    assert parse_answer("no evidence of a lesion", vocab).label == "no"


def test_parse_reports_every_label_mentioned_and_configured_synonyms():
    assert parse_answer("benign or malignant? malignant", VOCAB).mentioned == ["benign", "malignant"]
    vocab = answer_vocabulary(["benign", "malignant"], {"malignant": ["suspicious"]})
    assert parse_answer("Suspicious  for malignancy", vocab).label == "malignant"
    with pytest.raises(ValueError, match="would mean both"):
        answer_vocabulary(["benign", "malignant"], {"malignant": ["benign"]})
    with pytest.raises(ValueError, match="not in task.labels"):
        answer_vocabulary(["benign", "malignant"], {"normal": ["ok"]})
    # a built-in synonym yields to a configured label of that name
    assert answer_vocabulary(["cancer", "benign", "malignant"])["cancer"] == "cancer"


def test_classification_metrics_by_hand():
    refs = ["benign", "benign", "benign", "malignant", "malignant", "normal"]
    preds = ["benign", "malignant", None, "malignant", "benign", "normal"]
    m = classification_metrics(refs, preds, LABELS, n_boot=500, majority_label="benign")
    assert m["n"] == 6 and m["n_invalid"] == 1
    assert m["accuracy"]["mean"] == pytest.approx(3 / 6)
    assert m["confusion"]["columns"] == LABELS + ["invalid answer"]
    assert m["confusion"]["counts"] == [[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]]
    b, mal, n = (m["per_class"][k] for k in LABELS)
    assert (b["precision"]["mean"], b["recall"]["mean"], b["f1"]["mean"]) == pytest.approx((1 / 2, 1 / 3, 2 / 5))
    assert (mal["precision"]["mean"], mal["recall"]["mean"], mal["f1"]["mean"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (n["precision"]["mean"], n["recall"]["mean"], n["f1"]["mean"]) == pytest.approx((1.0, 1.0, 1.0))
    assert b["support"] == 3 and n["support"] == 1
    assert m["macro_f1"]["mean"] == pytest.approx((0.4 + 0.5 + 1.0) / 3)
    assert m["majority_rate"] == pytest.approx(0.5)
    for ci in (m["accuracy"], m["macro_f1"], b["recall"], mal["f1"]):
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert m["accuracy"]["hi"] - m["accuracy"]["lo"] > 0.2  # six samples: a wide interval
    # a class never predicted has undefined precision (NaN), not 0
    none_predicted = classification_metrics(["normal", "benign"], ["benign", "benign"], LABELS, n_boot=50)
    assert math.isnan(none_predicted["per_class"]["normal"]["precision"]["mean"])
    assert none_predicted["per_class"]["normal"]["recall"]["mean"] == 0.0


def test_mcnemar_exact():
    # 6 discordant pairs all in A's favour: p = 2 * 0.5**6
    a = [1] * 6 + [1, 0, 1]
    b = [0] * 6 + [1, 0, 1]
    r = mcnemar(a, b)
    assert (r["n"], r["a_only"], r["b_only"]) == (9, 6, 0)
    assert r["p_value"] == pytest.approx(2 * 0.5 ** 6)
    # 3 vs 2 discordant: symmetric, p = 1
    assert mcnemar([1, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1])["p_value"] == pytest.approx(1.0)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0
    assert mcnemar([1, float("nan")], [0, 1])["n"] == 1
