"""Where things live. Edit ``model_path_map`` to point at your local Hugging Face weights.

Every script also takes ``--model_path`` / ``--data_dir`` / ``--records_dir``, so a scripted run
never needs this file edited.
"""
from pathlib import Path

ROOT_PATH = Path(__file__).resolve().parent.parent

DATA_DIR = ROOT_PATH / "data"
RECORDS_DIR = ROOT_PATH / "records"
# What the embedded default generates: the synthetic world, and the tiny backbones pretrained on it
# (kept apart, so that regenerating the world never deletes a backbone).
SYNTHETIC_DIR = DATA_DIR / "synthetic"
TINY_BACKBONES_DIR = DATA_DIR / "tiny_backbones"

# Full backbone name -> local folder holding a Hugging Face checkpoint (config, weights, processor).
model_path_map = {
    # >>> EDIT THESE placeholder paths to your local copies of the real weights <<<
    "blip2-opt-2.7b": str(ROOT_PATH / "hugging_cache" / "blip2-opt-2.7b"),
    "llava-v1.5-7b": str(ROOT_PATH / "hugging_cache" / "llava-1.5-7b-hf"),
    # built with scripts/convert_minigpt4.py from the original MiniGPT-4 release
    "minigpt-4-vicuna-7b": str(ROOT_PATH / "hugging_cache" / "minigpt-4-vicuna-7b-hf"),
    # Tiny backbones pretrained by the project itself on the synthetic world (built on first use).
    "tiny-blip2": str(TINY_BACKBONES_DIR / "tiny-blip2"),
    "tiny-llava": str(TINY_BACKBONES_DIR / "tiny-llava"),
    "tiny-minigpt4": str(TINY_BACKBONES_DIR / "tiny-minigpt4"),
    # Auxiliary models of editors on the real backbones (local copies of the HF folders).
    "serac-classifier-bert-base-cased": str(ROOT_PATH / "hugging_cache" / "bert-base-cased"),
    "serac-counterfactual-opt-125m": str(ROOT_PATH / "hugging_cache" / "opt-125m"),
    # Auxiliary models of editors (RECIPE's knowledge encoder, LTE's retriever).
    "recipe-encoder-roberta-base": str(ROOT_PATH / "hugging_cache" / "roberta-base"),
    "lte-retriever-mpnet": str(ROOT_PATH / "hugging_cache" / "multi-qa-mpnet-base-dot-v1"),
    # A tiny RoBERTa built (random init, BPE tokenizer on the synthetic world's texts) on first use.
    "tiny-text-encoder": str(DATA_DIR / "aux_models" / "tiny-text-encoder"),
}

# Short names users type on the command line.
model_aliases = {
    "blip2": "blip2-opt-2.7b",
    "llava": "llava-v1.5-7b",
    "minigpt4": "minigpt-4-vicuna-7b",
}
