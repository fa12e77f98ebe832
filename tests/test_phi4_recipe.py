"""configs/phi4/: Phi-4's post-training order (SFT -> PTS DPO -> judge-guided DPO), each stage's recipe
loading into its stage's config, each stage reading what the one before it writes."""
from __future__ import annotations

from pathlib import Path

from distill.dpo import DPOConfig
from distill.judge import JudgeConfig
from distill.pts import PTSConfig
from distill.sft import SFTConfig
from reason.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "phi4"


def test_the_recipes_load_and_chain():
    sft = load_config(SFTConfig, RECIPES / "stage1-sft.yaml")
    pts = load_config(PTSConfig, RECIPES / "stage2-pts.yaml")
    pts_dpo = load_config(DPOConfig, RECIPES / "stage2-dpo.yaml")
    judge = load_config(JudgeConfig, RECIPES / "stage3-judge.yaml")
    judge_dpo = load_config(DPOConfig, RECIPES / "stage3-dpo.yaml")
    assert (pts.band, pts.p_gap, pts.samples) == ((0.2, 0.8), 0.2, 10)  # the paper's band; the tool's defaults
    assert pts.model == pts_dpo.model.path == f"{sft.train.out_dir}/final"
    assert judge_dpo.model.path == f"{pts_dpo.train.out_dir}/final"
    assert pts_dpo.dpo.reference is None and judge_dpo.dpo.reference is None  # each round's start is its reference
    assert judge.model == "gpt-4o"
    assert sft.chat == pts.chat == pts_dpo.chat == judge_dpo.chat  # sampled and trained in one format
    assert (pts_dpo.data.train[0].path, judge_dpo.data.train[0].path) == ("pts.jsonl", "judged.jsonl")
