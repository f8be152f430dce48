"""Synthetic visual world for the embedded default (see :mod:`synthetic.world`).

The names below are loaded lazily, so ``python -m synthetic.world`` does not import the module
twice.
"""

__all__ = [
    "DATASET_FILES", "PRETRAIN_FILES", "RECORD_KEYS", "Entity", "World", "WorldConfig",
    "build_world", "ensure_world", "generate_world", "is_complete", "iter_text_corpus",
    "load_dataset", "load_pretrain", "read_manifest", "render_entity", "text_corpus", "text_facts",
]


def __getattr__(name):
    if name in __all__:
        from synthetic import world

        return getattr(world, name)
    raise AttributeError(f"module 'synthetic' has no attribute {name!r}")
