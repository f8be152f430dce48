"""Lifelong editing evaluation: the protocol (``protocol``), batched scoring (``scoring``), results,
table and curves (``results``), the checkpoint owner check shared with training (``checkpoints``) and
the ``test_vllm_edit.py`` command line (``cli``). See the README, "Evaluation"."""
