"""The preflight must catch every silent-failure pattern of shared/design/pitfalls.md that shows in gradients."""
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from medtune.train.preflight import PreflightError, run_preflight


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


X = torch.rand(2, 3, 8, 8)
Y = (torch.rand(2, 1, 8, 8) > 0.7).float()


def preflight(model, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    return run_preflight(model, opt, lambda: F.binary_cross_entropy_with_logits(model(X), Y), **kw)


def lora(model, targets=r"^(body|head)$"):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def test_passes_on_full_model_and_restores_weights():
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = preflight(model)
    assert report.passed and report.n_trainable == 4 and report.zero_grad_first_step == []
    for k, v in model.state_dict().items():  # the real run starts from the untouched weights
        assert torch.equal(v, before[k]), k


def test_lora_a_zero_on_step_one_is_expected_not_dead():
    torch.manual_seed(0)
    model = lora(Tiny())
    report = preflight(model)
    assert report.passed
    assert report.zero_grad_first_step and all("lora_A" in n for n in report.zero_grad_first_step)
    assert any("LoRA-B starts at 0" in n for n in report.notes)


class NoGradHead(Tiny):
    """Pitfall 1: the head runs through an inference path; `.requires_grad_(True)` hides the error."""

    def forward(self, x):
        h = torch.relu(self.body(x))
        with torch.no_grad():
            out = self.head(h)
        return out.requires_grad_(True)


def test_fails_on_no_grad_head_and_names_dead_tensors():
    with pytest.raises(PreflightError) as err:
        preflight(NoGradHead())
    msg = str(err.value)
    assert "body.weight" in msg and "head.weight" in msg and "no_grad" in msg


class GenerateInPath(Tiny):
    @torch.no_grad()
    def generate(self, x):
        return self.head(torch.relu(self.body(x)))

    def forward(self, x):
        return self.generate(x)


def test_fails_when_loss_does_not_require_grad():
    with pytest.raises(PreflightError, match="does not require grad"):
        preflight(GenerateInPath())


def test_fails_on_zero_trainable_tensors_after_reload(tmp_path):
    """Pitfall 4: PeftModel.from_pretrained defaults to is_trainable=False."""
    torch.manual_seed(0)
    lora(Tiny()).save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(Tiny(), tmp_path)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2)
    with pytest.raises(PreflightError, match="0 trainable tensors.*is_trainable=True"):
        run_preflight(reloaded, opt, lambda: reloaded(X).mean())


class FusedHead(Tiny):
    """Pitfall 8: a fused path reads the base weight directly and bypasses the LoRA on `head`."""

    def forward(self, x):
        h = torch.relu(self.body(x))
        return F.conv2d(h, self.head.weight, self.head.bias)


def test_fails_when_fused_kernel_bypasses_adapter():
    torch.manual_seed(0)
    model = lora(FusedHead())
    with pytest.raises(PreflightError) as err:
        preflight(model)
    assert "head.lora_B" in str(err.value) and "body.lora_B" not in str(err.value)


class ReentrantCheckpoint(Tiny):
    """Pitfall 3: reentrant checkpointing over frozen inputs: adapters inside get no gradient."""

    def forward(self, x):
        h = checkpoint(lambda t: torch.relu(self.body(t)), x, use_reentrant=True)
        return self.head(h)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_fails_with_reentrant_checkpointing_over_frozen_input():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"^body$", modules_to_save=["head"])
    model = get_peft_model(ReentrantCheckpoint(), config)
    with pytest.raises(PreflightError) as err:
        preflight(model)
    assert "body.lora" in str(err.value)


class InPlaceOnLeafView(Tiny):
    """Pitfall 9: writing in place into a view of a leaf that requires grad."""

    def forward(self, x):
        w = self.head.weight.view(-1)
        w.masked_fill_(w < 0, 0.0)
        return self.head(torch.relu(self.body(x)))


def test_fails_clearly_on_in_place_op_on_leaf_view():
    with pytest.raises(PreflightError, match="in-place"):
        preflight(InPlaceOnLeafView())


def test_fails_when_optimizer_misses_a_trainable_tensor():
    model = Tiny()
    opt = torch.optim.AdamW(model.body.parameters(), lr=1e-2)
    with pytest.raises(PreflightError, match="missing from the optimizer.*head.weight"):
        run_preflight(model, opt, lambda: model(X).mean())


def test_fails_when_a_frozen_tensor_changes():
    model = Tiny()
    model.head.requires_grad_(False)
    opt = torch.optim.AdamW(model.body.parameters(), lr=1e-2)

    def loss_that_also_edits_frozen():
        with torch.no_grad():
            model.head.weight.add_(1e-3)
        return F.binary_cross_entropy_with_logits(model(X), Y)

    with pytest.raises(PreflightError, match="frozen tensors changed.*head.weight"):
        run_preflight(model, opt, loss_that_also_edits_frozen)


def test_fails_on_non_finite_loss():
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(PreflightError, match="not finite"):
        run_preflight(model, opt, lambda: model(X).mean() * float("nan"))


@pytest.mark.parametrize("family,finetune,prompt", [
    ("unet", "full", "none"),
    ("sam", "lora", "none"), ("sam", "lora", "box"), ("sam", "full", "none"), ("sam", "full", "box"),
    ("sam2", "lora", "none"), ("sam2", "lora", "box"), ("sam2", "full", "none"), ("sam2", "full", "box"),
])
def test_passes_on_every_real_family_and_mode(family, finetune, prompt):
    """Every trainable tensor of the shipped families reaches the mask loss (no silently dead parameters)."""
    import json

    from medtune.config import build_config
    from medtune.losses import ComboLoss
    from medtune.models.registry import build_model
    from medtune.models.sam import tiny_sam2_config_dict, tiny_sam_config_dict

    arch = {"sam": tiny_sam_config_dict(), "sam2": tiny_sam2_config_dict(),
            "unet": {"channels": [4, 8], "strides": [2], "num_res_units": 1}}[family]
    sampling = "whole_image" if prompt == "box" else "random_crop"
    cfg = build_config({}, [f"model.family={family}", f"model.config={json.dumps(arch)}",
                            f"model.finetune={finetune}", f"model.prompt={prompt}", f"data.sampling={sampling}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = torch.rand(2, 3, 40, 40), (torch.rand(2, 1, 40, 40) > 0.8).float()
    box = torch.tensor([[2.0, 2.0, 30.0, 30.0]] * 2) if prompt == "box" else None
    loss_fn = ComboLoss(cfg.loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    report = run_preflight(model, opt, lambda: loss_fn(model(x, box), y, None)[0])
    assert report.passed and report.n_trainable > 0
