"""Synthetic visual world for the embedded default (see :mod:`synthetic.world`)."""

from synthetic.world import (
    DATASET_FILES,
    PRETRAIN_FILES,
    RECORD_KEYS,
    Entity,
    World,
    WorldConfig,
    build_world,
    ensure_world,
    generate_world,
    is_complete,
    iter_text_corpus,
    load_dataset,
    load_pretrain,
    read_manifest,
    render_entity,
    text_corpus,
    text_facts,
)

__all__ = [
    "DATASET_FILES", "PRETRAIN_FILES", "RECORD_KEYS", "Entity", "World", "WorldConfig",
    "build_world", "ensure_world", "generate_world", "is_complete", "iter_text_corpus",
    "load_dataset", "load_pretrain", "read_manifest", "render_entity", "text_corpus", "text_facts",
]
