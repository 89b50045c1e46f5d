"""The staged training engine: freezing by role, export -> next stage, exact resume, FSDP2 == single process."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evev2.cli import main as cli
from evev2.data.samples import SampleBuilder
from evev2.train.engine import Trainer
from evev2.train.recipe import RecipeError, load_recipe
from evev2.train.record import RecipeChangedError


def write_recipe(path: Path, source: Path, world: Path, trainable: str, template: str = "plain", steps: int = 4,
                 extra: str = "") -> Path:
    data = world / ("train_captions.json" if template == "plain" else "train.json")
    path.write_text(f"""
name = "test-{path.stem}"
output = "{path.parent / ('run-' + path.stem)}"
[model]
source = "{source}"
[data]
sources = [{{ name = "synth", type = "llava", path = "{data}" }}]
template = "{template}"
max_size = 160
token_budget = 320
[optim]
lr = 3e-3
warmup_ratio = 0.25
[train]
trainable = {trainable}
steps = {steps}
global_batch = 8
micro_batch_rows = 2
{extra}
""")
    return path


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_vlm_dir, tiny_world_dir) -> Path:
    """A stage-1 run (patch embedding only), shared by the tests that build on its export."""
    root = tmp_path_factory.mktemp("stage1")
    recipe = write_recipe(root / "stage1.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed"]')
    assert cli(["train", "--recipe", str(recipe), "--output", str(root / "run")]) == root / "run" / "export"
    return root / "run"


def test_stage1_changes_only_the_patch_embedding(stage1, tiny_vlm_dir):
    diff = changed(weights(tiny_vlm_dir), weights(stage1 / "export"))
    assert diff and all(k.startswith("model.patch_embed.") for k in diff), sorted(diff)
    assert len(losses(stage1)) == 4 and (stage1 / "loss_curve.png").stat().st_size > 0
    assert [p.name for p in sorted((stage1 / "checkpoints").glob("step-*"))] == ["step-00000004"]


def test_resume_with_a_changed_recipe_is_one_line_and_the_traceback_lands_in_the_run_log(stage1, tmp_path):
    recipe = tmp_path / "changed.toml"
    recipe.write_text((stage1 / "recipe.resolved.toml").read_text().replace("lr = 0.003", "lr = 0.001"))
    result = subprocess.run([sys.executable, "-m", "evev2.cli", "train", "--recipe", str(recipe), "--output",
                             str(stage1), "--resume"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        line for line in result.stderr.splitlines() if line.startswith("evev2: error:") and "optim.lr" in line]
    log = (stage1 / "train.log").read_text()
    assert "Traceback" in log and "RecipeChangedError" in log and "optim.lr: 0.003 -> 0.001" in log


def test_stage2_1_from_stage1_export_changes_patch_embedding_and_vision_copies(stage1, tiny_world_dir, tmp_path):
    recipe = write_recipe(tmp_path / "stage21.toml", stage1 / "export", tiny_world_dir, '["patch_embed", "vision"]',
                          steps=2)
    cli(["train", "--recipe", str(recipe), "--output", str(tmp_path / "run")])
    before, after = weights(stage1 / "export"), weights(tmp_path / "run" / "export")
    diff = changed(before, after)
    assert any(".vision_" in k for k in diff) and any(k.startswith("model.patch_embed.") for k in diff)
    assert all(".vision_" in k or k.startswith("model.patch_embed.") for k in diff), sorted(diff)
    # the whole model (stage 2.2 style, chat template) trains from that export too
    recipe = write_recipe(tmp_path / "stage22.toml", tmp_path / "run" / "export", tiny_world_dir,
                          '["patch_embed", "vision", "text", "embeddings"]', template="eve", steps=1)
    cli(["train", "--recipe", str(recipe), "--output", str(tmp_path / "run22")])
    assert any(".vision_" not in k and "patch_embed" not in k
               for k in changed(after, weights(tmp_path / "run22" / "export")))


def sigkill_after_checkpoint(recipe: Path, output: Path, step: int) -> None:
    """Run `evev2 train` in a subprocess and SIGKILL it once the checkpoint of `step` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "evev2.cli", "train", "--recipe", str(recipe), "--output",
                             str(output)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (output / "checkpoints" / f"step-{step:08d}").exists():
        assert proc.poll() is None and time.time() < deadline, f"training subprocess ended before step {step}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # a training subprocess
def test_sigkill_then_resume_equals_uninterrupted(tiny_vlm_dir, tiny_world_dir, tmp_path):
    """Killed and resumed with 2 data workers, the run equals an uninterrupted one without workers."""
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed", "vision"]', steps=5,
                          extra="[checkpoint]\nevery = 1\nkeep_last = 2")
    recipe.write_text(recipe.read_text().replace("[optim]", "num_workers = 2\n[optim]"))
    Trainer(load_recipe(recipe, ["data.num_workers=0"]), tmp_path / "ref", show_progress=False).train()
    sigkill_after_checkpoint(recipe, tmp_path / "killed", step=2)
    Trainer(load_recipe(recipe), tmp_path / "killed", resume=True, show_progress=False).train()
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")  # bit-exact on CPU
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 2


class _SlowDecoder(SampleBuilder):
    """Adds a known delay per image, as a slow JPEG decoder would (sleeping: it leaves the CPU to the training)."""

    delay_s = 0.1

    def _load_images(self, images):
        time.sleep(self.delay_s * len(images))
        return super()._load_images(images)


class _SlowDataTrainer(Trainer):
    def _sample_builder(self) -> SampleBuilder:
        return _SlowDecoder(self.processor, self.recipe.data.token_budget)


@pytest.mark.slow  # two timed runs
def test_data_workers_hide_a_slow_decoder_and_change_no_loss(tiny_vlm_dir, tiny_world_dir, tmp_path):
    """8 images per step at 0.1 s each: 2 workers prepare steps while the model trains, on the same data."""
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed", "vision"]', steps=7)
    runs = {}
    for workers in (0, 2):
        _SlowDataTrainer(load_recipe(recipe, [f"data.num_workers={workers}"]), tmp_path / f"w{workers}",
                         show_progress=False).train()
        runs[workers] = [json.loads(line) for line in (tmp_path / f"w{workers}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in runs[2]] == [r["loss"] for r in runs[0]]  # bit-identical data and numerics
    # steady state: after step 1, for which both workers start at once (steps then alternate: one waits, one not)
    steady = {w: statistics.mean(r["step_time_s"] for r in rows[1:]) for w, rows in runs.items()}
    assert steady[2] <= 0.6 * steady[0], steady
    waits = {w: statistics.mean(r["data_wait_s"] for r in rows[1:]) for w, rows in runs.items()}
    assert waits[0] >= 8 * 0.1 and waits[2] < waits[0] / 2, waits  # in-process, the whole decode is waited for


class _TermAfterTwo(Trainer):
    def train_step(self):
        metrics = super().train_step()
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics


def test_sigterm_saves_and_exits_cleanly(tiny_vlm_dir, tiny_world_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed"]', steps=4)
    assert _TermAfterTwo(load_recipe(recipe), tmp_path / "run", show_progress=False).train() is None
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert not (tmp_path / "run" / "export").exists()
    with pytest.raises(RecipeChangedError, match=r"optim.lr: 0.003 -> 0.001.*--force"):  # before any weight loads
        Trainer(load_recipe(recipe, ["optim.lr=1e-3"]), tmp_path / "run", resume=True, show_progress=False)
    # the data workers change no number: resuming with another count is accepted
    Trainer(load_recipe(recipe, ["data.num_workers=1"]), tmp_path / "run", resume=True, show_progress=False).train()
    assert len(losses(tmp_path / "run")) == 4 and (tmp_path / "run" / "export" / "config.json").exists()
    assert load_recipe(tmp_path / "run" / "recipe.resolved.toml") == load_recipe(recipe, ["data.num_workers=1"])
    launches = json.loads((tmp_path / "run" / "run.json").read_text())["launches"]
    assert len(launches) == 2 and launches[-1]["versions"]["torch"] == torch.__version__


# Two ranks sum gradients in another order than one process; Adam turns that into update differences of a small
# fraction of one step on weights whose gradients are near zero (measured: up to 4.9e-5; and 5.3e-5 between two
# single-process runs whose attention kernels only sum in another order). A sharding error moves weights by whole
# steps (lr 3e-3 in `write_recipe`): the tolerance is a tenth of one.
WEIGHT_ATOL = 3e-4


@pytest.mark.slow  # torchrun
def test_fsdp2_two_ranks_equal_one_process(tiny_vlm_dir, tiny_world_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed", "vision", "text"]',
                          steps=3)
    Trainer(load_recipe(recipe), tmp_path / "one", show_progress=False).train()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "evev2.cli", "train", "--recipe", str(recipe), "--output", str(tmp_path / "two")],
                   env=env, check=True, capture_output=True, timeout=300)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)
    torch.testing.assert_close(weights(tmp_path / "two" / "export"), weights(tmp_path / "one" / "export"),
                               rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.slow  # torchrun + inductor
def test_fsdp2_with_compiled_checkpointed_layers_equals_eager_one_process(tiny_vlm_dir, tiny_world_dir, tmp_path):
    """The GPU default (compiled layers) with activation checkpointing under FSDP2, here on 2 gloo ranks."""
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed", "vision"]', steps=2)
    Trainer(load_recipe(recipe), tmp_path / "one", show_progress=False).train()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "evev2.cli", "train", "--recipe", str(recipe), "--output", str(tmp_path / "two"),
                    "train.compile=true", "train.activation_checkpointing=true"],
                   env=env, check=True, capture_output=True, timeout=300)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)
    torch.testing.assert_close(weights(tmp_path / "two" / "export"), weights(tmp_path / "one" / "export"),
                               rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.parametrize("edit,message", [
    (("trainable = [\"patch_embed\"]", "trainable = [\"vison\"]"), "train.trainable"),
    (("lr = 3e-3", "lr = \"fast\""), "optim.lr: expected float"),
    (("steps = 4", "steps = 4\nbatch = 3"), "train.batch: unknown field"),
    (("[optim]\n", "[optim]\nbetas = [0.9, \"x\"]\n"), "optim.betas[1]"),
    (("source = ", "sauce = "), "model.sauce: unknown field"),
    (("path = ", "span = [0.25, 1.0], path = "), "data.sources[].span: no source spans step 1 of 4"),
])
def test_malformed_recipe_names_the_field(tmp_path, tiny_world_dir, edit, message):
    recipe = write_recipe(tmp_path / "r.toml", Path("x"), tiny_world_dir, '["patch_embed"]')
    recipe.write_text(recipe.read_text().replace(*edit, 1))
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(recipe)


def test_flex_attention_training_on_cpu_is_refused_in_one_line(tiny_vlm_dir, tiny_world_dir, tmp_path):
    """torch has no FlexAttention backward on CPU: the recipe is refused before any weight is loaded."""
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed"]')
    with pytest.raises(RecipeError, match="flex_attention.*only on CUDA"):
        Trainer(load_recipe(recipe, ["model.attn_implementation=flex_attention"]), tmp_path / "run")


def test_overrides_and_shipped_recipes_parse():
    paths = sorted(Path("recipes").rglob("*.toml"))
    assert len(paths) >= 5
    for path in paths:
        recipe = load_recipe(path, ["train.steps=7", "optim.group_lr.patch_embed=1e-3"])
        assert recipe.train.steps == 7 and recipe.optim.group_lr["patch_embed"] == 1e-3


@pytest.mark.parametrize("stage,trainable,lr,batch,max_size,length", [
    ("stage1", ["patch_embed"], 2e-4, 1024, 800, 2048),
    ("stage2_1", ["patch_embed", "vision"], 1e-4, 1024, 800, 2048),
    ("stage2_1_hd", ["patch_embed", "vision"], 5e-5, 1024, 1600, 4096),
    ("stage2_2", ["patch_embed", "vision", "text", "embeddings"], 2e-5, 512, 1600, 4096),
    ("stage3", ["patch_embed", "vision", "text", "embeddings"], 1e-5, 512, 1600, 5000),
])
def test_paper_recipes_match_the_official_stage_table(stage, trainable, lr, batch, max_size, length):
    r = load_recipe(Path("recipes/paper") / f"{stage}.toml")
    assert (r.train.trainable, r.optim.lr, r.train.global_batch, r.data.max_size, r.data.token_budget) == (
        trainable, lr, batch, max_size, length)
    assert (r.optim.warmup_ratio, r.optim.weight_decay, r.model.dtype) == (0.03, 0.0, "bfloat16")


def test_activation_checkpointing_gives_the_same_losses(tiny_vlm_dir, tiny_world_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed", "vision"]', steps=2)
    Trainer(load_recipe(recipe), tmp_path / "plain", show_progress=False).train()
    trainer = Trainer(load_recipe(recipe, ["train.activation_checkpointing=true"]), tmp_path / "ac", show_progress=False)
    assert trainer.model.model.layers[0].gradient_checkpointing
    trainer.train()
    torch.testing.assert_close(losses(tmp_path / "ac"), losses(tmp_path / "plain"), rtol=0, atol=1e-6)


@pytest.mark.slow  # inductor compilation
def test_compiled_layers_give_the_same_losses(tiny_vlm_dir, tiny_world_dir, tmp_path):
    """`train.compile` (every decoder layer under torch.compile, inductor) trains like eager, batch shapes varying:
    packed rows of QA conversations, so the sample-by-sample attention (SDPA, the CPU default) meets new packings."""
    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed", "vision"]', template="eve",
                          steps=3)
    Trainer(load_recipe(recipe), tmp_path / "plain", show_progress=False).train()
    trainer = Trainer(load_recipe(recipe, ["train.compile=true"]), tmp_path / "compiled", show_progress=False)
    assert all(layer._compiled_call_impl is not None for layer in trainer.model.model.layers)
    trainer.train()
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "plain"), rtol=0, atol=1e-5)
