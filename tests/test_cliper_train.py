"""CLIPer on the fake backend: training data, heads, saving/loading, the method plug-in."""

import json

import pytest
import torch

from prefsteer.backends import GenerationConfig, load_backend
from prefsteer.methods.cliper.heads import (available_classifiers, load_classifier, read_classifier,
                                         save_classifier)
from prefsteer.methods.cliper.train import (TrainConfig, features, generate_preference_data, preference_items,
                                    train_classifier)
from prefsteer.methods import get_method_class
from prefsteer.types import PreferencePair

TOPICS = "dog cat car house job friend family school money girlfriend boyfriend work".split()
PROMPTS = [f"my {t} and the {v} please" for t in TOPICS for v in ("post", "story", "data")]


@pytest.fixture(scope="module")
def backend():
    return load_backend("fake")


@pytest.fixture(scope="module")
def data(backend):
    return generate_preference_data(backend, PROMPTS, ["humor", "concise"], max_new_tokens=16)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, backend, data):
    d = tmp_path_factory.mktemp("cliper")
    for name in ("humor", "concise"):
        head, _ = train_classifier(backend, preference_items(data, name), name,
                                   TrainConfig(rank=4, steps=150), data_description={"kind": "test"})
        save_classifier(head, d)
    return d


@pytest.fixture(autouse=True)
def isolated_user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSTEER_CLIPER_DIR", str(tmp_path / "user-cliper"))


def test_data_labels_and_features(backend, data):
    assert [len(data[k]) for k in ("plain", "humor", "concise")] == [len(PROMPTS)] * 3
    assert {it.label for it in data["plain"]} == {0} and {it.label for it in data["humor"]} == {1}
    items = preference_items(data, "humor")
    f = features(backend, items)
    n = sum(len(backend.encode_continuation(it.text)) for it in items)
    assert f["H"].shape == (n, backend.hidden_size) and f["E"].shape == (n, backend.hidden_size)
    # features are read under the plain prompt: the instructed answer's first state is the plain one's
    assert torch.allclose(f["H"][f["item"] == 0][0], f["H"][f["item"] == len(PROMPTS)][0])


def test_classifier_accuracy_and_sidecar(classifier_dir, backend):
    meta = json.loads((classifier_dir / "humor.json").read_text())
    assert meta["name"] == "humor" and meta["fingerprint"] == backend.fingerprint
    assert meta["data"]["positives"] == meta["data"]["negatives"] == len(PROMPTS)
    assert meta["metrics"]["validation"]["answer_accuracy"] >= 0.8
    head = read_classifier(classifier_dir / "humor.safetensors")
    assert head.rank == 4 and head.name == "humor"


def test_load_by_name_checks_the_fingerprint(classifier_dir, backend):
    assert load_classifier("humor", backend.fingerprint, [classifier_dir]).name == "humor"
    assert set(available_classifiers(backend.fingerprint, [classifier_dir])) == {"humor", "concise"}
    with pytest.raises(ValueError, match="trained for another model") as e:
        load_classifier("humor", "hf:someothermodel", [classifier_dir])
    assert "hf:someothermodel" in str(e.value) and "prefsteer cliper train" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no classifier 'mine'"):
        load_classifier("mine", backend.fingerprint, [classifier_dir])


def test_a_head_serves_the_same_weights_in_another_precision_by_its_weights_id(tmp_path):
    """A head records the model's fingerprint and its weights' identity: a backend of the same
    weights in another precision (a GPU's bfloat16) finds it by the second, another model does not;
    a head of the backend's own fingerprint comes first."""
    from prefsteer.methods.cliper.heads import PreferenceHead

    def write(folder, name, fp, wid, rank):
        meta = {"name": name, "fingerprint": fp, **({"weights_id": wid} if wid else {})}
        save_classifier(PreferenceHead(8, rank, meta), tmp_path / folder)
    write("fp32", "humor", "hf:float32", "weights:w1", 2)
    write("other", "concise", "hf:othermodel", "weights:w2", 2)
    write(".", "formal", "hf:old", None, 2)  # a head from before weights ids: its fingerprint alone
    dirs = [tmp_path]
    assert load_classifier("humor", "hf:bfloat16", dirs, weights_id="weights:w1").meta["fingerprint"] == "hf:float32"
    assert set(available_classifiers("hf:bfloat16", dirs, "weights:w1")) == {"humor"}
    with pytest.raises(ValueError, match="trained for another model"):
        load_classifier("humor", "hf:bfloat16", dirs)  # no weights id given: the fingerprint must match
    with pytest.raises(ValueError, match="trained for another model"):
        load_classifier("concise", "hf:bfloat16", dirs, weights_id="weights:w1")
    with pytest.raises(ValueError, match="trained for another model"):
        load_classifier("formal", "hf:bfloat16", dirs, weights_id="weights:w1")
    write("bf16", "humor", "hf:bfloat16", "weights:w1", 3)  # one trained on the bfloat16 model itself wins
    assert load_classifier("humor", "hf:bfloat16", dirs, weights_id="weights:w1").rank == 3
    assert available_classifiers("hf:bfloat16", dirs, "weights:w1")["humor"].parent.name == "bf16"


def cliper(backend, classifier_dir, **kw):
    return get_method_class("cliper")(backend, classifier_dirs=[str(classifier_dir)], **kw)


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=20),
                                    GenerationConfig(max_new_tokens=20, do_sample=True, seed=3)])
def test_alpha_zero_is_plain_decoding(backend, classifier_dir, config):
    plain = get_method_class("none")(backend).generate("u", PROMPTS[:4], config)
    guided = cliper(backend, classifier_dir, prefs="humor=1,concise=0.5", alpha=0).generate("u", PROMPTS[:4], config)
    assert [o.text for o in guided] == [o.text for o in plain]


def test_guidance_raises_the_classifiers_score(backend, classifier_dir):
    # plumbing: candidates, embeddings and heads line up, so the guided answers read back as more
    # "humor" to the head (on the real model an independent scorer checks the direction)
    from prefsteer.methods.cliper.train import LabelledText

    cfg = GenerationConfig(max_new_tokens=20)
    prompts = PROMPTS[::3]
    head = load_classifier("humor", backend.fingerprint, [classifier_dir])

    def mean_log_odds(alpha):
        m = cliper(backend, classifier_dir, prefs="humor", alpha=alpha)
        outs = backend.generate([[{"role": "user", "content": p}] for p in prompts], cfg,
                                guide=m.guide_for("u")[0])
        f = features(backend, [LabelledText(p, o.text, 0, i) for i, (p, o) in enumerate(zip(prompts, outs))])
        with torch.no_grad():
            return head(f["H"], f["E"]).mean().item()

    assert mean_log_odds(4.0) > mean_log_odds(0.0) + 1.0


def test_method_arguments_are_validated(backend, classifier_dir):
    with pytest.raises(ValueError, match="unknown preference 'sarcasm'"):
        cliper(backend, classifier_dir, prefs="sarcasm=1")
    with pytest.raises(ValueError, match="`alpha` \\(=-1.0\\)"):
        cliper(backend, classifier_dir, prefs="humor", alpha=-1)
    with pytest.raises(ValueError, match="`top_k` \\(=0\\)"):
        cliper(backend, classifier_dir, prefs="humor", top_k=0)
    # the shipped 'formal' classifier belongs to the default model, not to the fake one
    with pytest.raises(ValueError, match="'formal' was trained for another model"):
        cliper(backend, classifier_dir, prefs="formal")
    with pytest.raises(ValueError, match="no preference to guide with"):
        cliper(backend, classifier_dir).generate("nobody", ["hi"])


def test_personal_classifier(backend, classifier_dir):
    # a user who likes jokes: chosen answers are funny, rejected ones formal
    from prefsteer.methods.base import NotFittedError

    funny, formal = "funny joke lol wow humor", "dear sir regards formal analysis"
    pairs = [PreferencePair("u1", p, f"{funny} about my {t}", f"{formal} about my {t}", f"p{i}")
             for i, (p, t) in enumerate(zip(PROMPTS, TOPICS * 3))]
    m = cliper(backend, classifier_dir, alpha=3.0)
    with pytest.raises(NotFittedError, match="user 'u1' has not been fitted with the 'cliper' method"):
        m.margins("u1", pairs[:2])
    m.fit("u1", pairs[:24])
    margins = m.margins("u1", pairs[24:])
    assert len(margins) == len(pairs) - 24 and all(x > 0 for x in margins)
    # without prefs a fitted user is guided by their own classifier: its answers read as theirs
    from prefsteer.methods.cliper.train import LabelledText

    cfg = GenerationConfig(max_new_tokens=10)
    out = m.generate("u1", PROMPTS[:4], cfg)
    assert out[0].extra["prefs"] == {"personal": 1.0}
    plain = get_method_class("none")(backend).generate("u1", PROMPTS[:4], cfg)
    head = m.personal_head("u1")

    def log_odds(outs):
        f = features(backend, [LabelledText(p, o.text, 0, i) for i, (p, o) in enumerate(zip(PROMPTS, outs))])
        with torch.no_grad():
            return head(f["H"], f["E"]).mean().item()

    assert log_odds(out) > log_odds(plain) + 1.0
    m2 = cliper(backend, classifier_dir, prefs="personal=1,humor=0.5", alpha=1.0)
    with pytest.raises(NotFittedError, match="user 'u2'"):
        m2.generate("u2", PROMPTS[:1])


def test_the_data_curve_benchmark_scores_every_head_on_the_same_held_out_posts(tmp_path):
    """benchmarks/cliper_data.py on the fake backend: heads on the first 4 and 8 posts, the last 4
    posts never trained on, and sizes beyond the training posts refused before anything loads."""
    import importlib.util
    import json
    from pathlib import Path

    from prefsteer.errors import InputError
    from prefsteer.methods.cliper.data import tldr_prompts

    spec = importlib.util.spec_from_file_location(
        "cliper_data", Path(__file__).resolve().parents[1] / "benchmarks" / "cliper_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    topics = ["cat", "dog", "job", "money", "school", "car", "house", "friend"]
    data = tmp_path / "tldr.json"
    data.write_text("".join(json.dumps({
        "info": {"id": f"t3_p{i}", "post": f"My {topics[i % 8]} problem number {i}, and what I did about it.",
                 "title": f"post {i}", "subreddit": "test"},
        "summaries": [{"text": " a short summary", "policy": "a"}, {"text": " another summary", "policy": "b"}],
        "choice": 0,
        "worker": "w1", "batch": "fake"}) + "\n" for i in range(80)))
    assert len(tldr_prompts("train", None, data)) >= 12
    out = tmp_path / "curve"
    args = bench.make_parser().parse_args(["--backend", "fake", "--prefs", "concise", "--n-prompts", "12",
                                           "--held-out", "4", "--sizes", "4", "8", "--data", str(data),
                                           "--max-new-tokens", "6", "--out", str(out)])
    assert bench.main(args) == 0
    res = json.loads((out / "curve.json").read_text())
    curve = res["prefs"]["concise"]["curve"]
    assert [r["train_posts"] for r in curve] == [4, 8] and all(r["answers"] == 2 * 4 for r in curve)
    assert all(0 <= r["token_accuracy"] <= 1 for r in curve) and len(res["posts"]) == 12
    assert "| concise | 8 |" in (out / "curve.md").read_text() and (out / "answers.jsonl").is_file()
    with pytest.raises(InputError, match="--sizes"):
        bench.main(bench.make_parser().parse_args(["--backend", "fake", "--n-prompts", "12", "--held-out", "4",
                                                   "--sizes", "9", "--data", str(data), "--out", str(out)]))
