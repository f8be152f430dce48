"""The one interface every backbone wrapper offers.

A wrapper turns samples ``(prompt, image, target)`` into LLM input embeddings with padding (a
``VLBatch``), runs the LLM layer by layer so an editor can act on the output of any decoder layer,
and can run the LLM from layer ``i`` onwards given that layer's output (training editors does not
recompute the frozen bottom half).

Family wrappers (``blip2.py``, ``llava.py``, ``minigpt4.py``) only say how a prompt is templated,
how images become embeddings, and which decoder stack (``stacks.py``) the LLM is.
"""
import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import torch

from backbones.devices import PerDevice, module_device
from backbones.sites import edits_by_layer
from backbones.stacks import DecoderStack
from vl_datasets.records import Sample, open_image

IGNORE = -100

# An edit at a named site of a decoder layer (backbones/sites.py): f(tensor, batch) -> new tensor.
# Passed explicitly per call as ``layer_edits = {Site(component, layer) or layer index: f}``; an int
# key is that layer's block output.
LayerEdit = Callable[[torch.Tensor, "VLBatch"], torch.Tensor]


@dataclass
class VLBatch:
    """A right-padded batch. Ranges are ``[start, end)`` token positions per sample."""

    input_ids: torch.Tensor       # [B, L] with the image placeholder id at vision positions
    inputs_embeds: torch.Tensor   # [B, L, D] text embeddings with image features inserted
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    labels: torch.Tensor          # [B, L] the token id on target positions, IGNORE elsewhere
    vision_range: torch.Tensor    # [B, 2]; (0, 0) for a text-only sample
    prompt_range: torch.Tensor    # [B, 2] prompt tokens after the vision tokens
    target_range: torch.Tensor    # [B, 2]; empty when encoded without targets

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    @property
    def has_image(self) -> torch.Tensor:
        return self.vision_range[:, 1] > self.vision_range[:, 0]

    def to(self, device) -> "VLBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class ImageFeatureCache:
    """Image features (what ``image_features`` gives, in the LLM's input space) by image file (path,
    modification time and size), for passes that need no gradient: an evaluation encodes each image
    many times (before the edits, at every point of a stream, and for each edit), and on a tiny
    backbone opening, preprocessing and encoding an image costs about three times the language
    model's forward on its sample.

    Entries are valid for one state of the vision-side weights (vision encoder + connector): that
    state is keyed by each parameter's storage and in-place version counter, so an editor that
    changes them in place (FT-M writes its connector with ``copy_``) empties the cache on the next
    lookup. (Assigning ``param.data`` is not seen: editors must not.) Least recently used entries
    leave first, beyond ``max_bytes`` (0: no caching)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.weights_key = None
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def check(self, weights_key) -> None:
        if weights_key != self.weights_key:
            self.clear()
            self.weights_key = weights_key

    def get(self, key: tuple):
        t = self.entries.get(key)
        if t is not None:
            self.entries.move_to_end(key)
        return t

    def put(self, key: tuple, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, t = self.entries.popitem(last=False)
            self.bytes -= t.numel() * t.element_size()


def image_file_key(path: str) -> tuple:
    """What identifies an image file's content cheaply: its path, modification time and size."""
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class VLBackbone:
    """Base wrapper. Subclasses set ``family`` and implement the three family hooks below."""

    family = "base"
    image_token = "<image>"
    fingerprint = None   # digest of the weights (backbones/fingerprint.py), set by load_backbone
    image_cache_bytes = 512 * 2 ** 20   # ImageFeatureCache budget (test_vllm_edit.py --image_cache_mb)
    decode_with_cache = True            # editors may decode with the key/value cache (False: --decode_all)
    image_batch = 64                    # images encoded per call when filling the image cache

    def __init__(self, name: str, model, processor, stack: DecoderStack, n_vision_tokens: int):
        self.name = name
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.stack = stack
        self.n_vision_tokens = n_vision_tokens
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self._tokenize_cached = functools.lru_cache(maxsize=1 << 16)(self._tokenize)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.image_cache = ImageFeatureCache(self.image_cache_bytes)

    # ---- family hooks -------------------------------------------------------------------------
    def prompt_text(self, prompt: str, has_image: bool) -> str:
        """The templated prompt; contains ``n_vision_tokens`` image tokens where the image sits."""
        raise NotImplementedError

    def prefix_ids(self, has_image: bool) -> list[int]:
        """Token ids placed before the tokenized prompt (BLIP-2 puts its image tokens before BOS)."""
        return []

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, n_vision_tokens, D] embeddings in the LLM's input space."""
        raise NotImplementedError

    # ---- facts --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.stack.layers)

    @property
    def hidden_size(self) -> int:
        return self.stack.hidden_size

    @property
    def layer_path_template(self) -> str:
        """Module path of decoder layer i inside ``self.model``, e.g. 'language_model.model.layers.{}'."""
        return self.stack.layer_path_template

    def layer(self, i: int) -> torch.nn.Module:
        return self.stack.layers[i]

    # ---- module sites (backbones/sites.py): what weight-editing editors may change --------------
    def mlp_input_projections(self, i: int) -> list[torch.nn.Linear]:
        """The FFN input projections of decoder layer ``i`` (OPT ``fc1``; Llama ``gate_proj``, ``up_proj``)."""
        return self.stack.mlp_input_projections(i)

    def mlp_output_projection(self, i: int) -> torch.nn.Linear:
        """The FFN output projection of decoder layer ``i`` (OPT ``fc2``; Llama ``down_proj``)."""
        return self.stack.mlp_output_projection(i)

    def connector_parameters(self) -> list[torch.nn.Parameter]:
        """The vision-language connector's weights: what maps vision-encoder outputs into the LLM's
        input space (BLIP-2 / MiniGPT-4: Q-Former, query tokens, projection; LLaVA: the projector)."""
        raise NotImplementedError

    def vision_side_parameters(self) -> list[torch.nn.Parameter]:
        """Every weight ``image_features`` reads: the vision encoder's and the connector's."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where batches are built: the input embeddings' device (of a split model: its first one)."""
        return module_device(self.model.get_input_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ---- encoding -----------------------------------------------------------------------------
    def pixel_values(self, images) -> torch.Tensor:
        pv = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.dtype)

    def tokenize(self, prompt: str, has_image: bool, target: str | None):
        """Cached ``_tokenize``: prompts and targets repeat a lot in training and evaluation."""
        return self._tokenize_cached(prompt, has_image, target)

    def _tokenize(self, prompt: str, has_image: bool, target: str | None):
        """Token ids of the sample and the number of them that are context (the rest is target).

        The target gets a leading space when the prompt does not end in whitespace. Prompt and
        target are tokenized jointly and split at their common prefix, so the target tokens are
        exactly those the model produces after the prompt (a trailing space of the prompt is
        carried by the first target token, as in generation)."""
        text = self.prompt_text(prompt, has_image)
        prefix = self.prefix_ids(has_image)
        context = self.tokenizer(text.rstrip(), add_special_tokens=True)["input_ids"]
        if target is None:
            return tuple(prefix + context), len(prefix) + len(context)
        sep = "" if text[-1:].isspace() else " "
        full = self.tokenizer(text + sep + target, add_special_tokens=True)["input_ids"]
        n = common_prefix_len(context, full)
        if n == len(full):
            raise ValueError(f"target {target!r} adds no token after prompt {prompt!r}")
        return tuple(prefix + full), len(prefix) + n

    def warm_image_cache(self, paths: Sequence[str]) -> None:
        """Encode the images of ``paths`` that the cache lacks, in groups (what a scoring pass will
        ask for, one small batch at a time). No-op while autograd records or with the cache off."""
        if paths and not torch.is_grad_enabled() and self.image_cache.max_bytes > 0:
            self.images_features(list(dict.fromkeys(paths)))

    def images_features(self, paths: Sequence[str]) -> torch.Tensor | None:
        """[N, n_vision_tokens, D] features of the images at ``paths`` (opened here). Without autograd
        they come from ``image_cache`` (each missing image encoded once); with autograd on (an editor
        training through the connector), they are computed, in one batch."""
        if not paths:
            return None
        cache = self.image_cache
        if torch.is_grad_enabled() or cache.max_bytes <= 0:
            return self.image_features(self.pixel_values([open_image(p) for p in paths]))
        cache.check(tuple((p.data_ptr(), p._version) for p in self.vision_side_parameters()))
        keys = {p: image_file_key(p) for p in paths}       # a file rewritten in place is a new image
        missing = [p for p in keys if cache.get(keys[p]) is None]
        fresh = {}
        # Missing images are encoded together, in groups of ``image_batch`` (one at a time, the
        # tiny encoders spend most of their time in Python). Made outside inference mode, so that
        # edits, which run outside it, can use them too.
        with torch.inference_mode(False), torch.no_grad():
            for i in range(0, len(missing), self.image_batch):
                group = missing[i:i + self.image_batch]
                for p, f in zip(group, self.image_features(self.pixel_values([open_image(p) for p in group]))):
                    fresh[p] = f
                    cache.put(keys[p], f)
        cache.hits += len(paths) - len(missing)
        cache.misses += len(missing)
        return torch.stack([fresh[p] if p in fresh else cache.get(keys[p]) for p in paths])

    def encode(self, samples: Sequence[Sample], with_targets: bool = True) -> VLBatch:
        """Encode samples into one right-padded batch (images opened here, lazily)."""
        rows = [self.tokenize(s.prompt, s.image is not None, s.target if with_targets else None)
                for s in samples]
        return self.collate(samples, rows, image_features=self.images_features([s.image for s in samples if s.image is not None]))

    def encode_continuations(self, samples: Sequence[Sample], continuations: Sequence[Sequence[int]]) -> VLBatch:
        """Each sample's generation context (what ``generate`` starts from) followed by the given
        token ids as its target: teacher forcing on it tells whether greedy decoding would produce
        exactly those tokens."""
        rows = []
        for s, cont in zip(samples, continuations):
            ctx, n = self.tokenize(s.prompt, s.image is not None, None)
            rows.append((tuple(ctx) + tuple(cont), n))
        return self.collate(samples, rows, image_features=self.images_features([s.image for s in samples if s.image is not None]))

    def collate(self, samples: Sequence[Sample], rows, pixel_values=None, image_features=None) -> VLBatch:
        """Pad tokenized ``rows`` (from ``tokenize``) into a batch and insert the image features of
        ``pixel_values`` (one image per sample that has one, in order), or ``image_features`` given
        as they are ([N, n_vision_tokens, D], e.g. computed from cached encoder outputs)."""
        B, L = len(rows), max(len(ids) for ids, _ in rows)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        for b, (ids, _) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1
        is_vision = (input_ids == self.image_token_id) & attention_mask.bool()
        vision_range = torch.zeros(B, 2, dtype=torch.long)
        for b, s in enumerate(samples):
            pos = is_vision[b].nonzero().flatten()
            if s.image is None:
                if len(pos):
                    raise ValueError(f"text-only prompt {s.prompt!r} contains image tokens")
                continue
            if len(pos) != self.n_vision_tokens or pos[-1] - pos[0] + 1 != len(pos):
                raise ValueError(f"{self.name}: expected {self.n_vision_tokens} contiguous image tokens, "
                                 f"found {len(pos)} for prompt {s.prompt!r}")
            vision_range[b] = torch.stack([pos[0], pos[-1] + 1])
        lengths = attention_mask.sum(1)
        ctx = torch.tensor([n_ctx for _, n_ctx in rows])
        prompt_start = torch.where(vision_range[:, 1] > 0, vision_range[:, 1], torch.zeros_like(ctx))
        prompt_range = torch.stack([prompt_start, ctx], 1)
        target_range = torch.stack([ctx, lengths], 1)
        pos = torch.arange(L)
        in_target = (pos >= ctx[:, None]) & (pos < lengths[:, None])
        labels = torch.where(in_target, input_ids, torch.full_like(input_ids, IGNORE))

        input_ids = input_ids.to(self.device)
        embeds = self.model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image_features = self.image_features(pixel_values.to(self.device, self.dtype))
        if image_features is not None:
            mask = is_vision.to(embeds.device)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image_features.to(embeds.device, embeds.dtype))
        return VLBatch(input_ids, embeds, attention_mask.to(self.device), labels.to(self.device),
                       vision_range.to(self.device), prompt_range.to(self.device),
                       target_range.to(self.device))

    # ---- running the LLM ----------------------------------------------------------------------
    def _run(self, batch: VLBatch, start: int, stop: int, hidden=None, layer_edits=None, cache=None):
        """Run decoder layers ``start..stop-1`` from ``hidden`` (the output of layer ``start-1``, or
        the input embeddings when ``start`` is 0), applying the ``layer_edits`` of each layer's
        named sites (``backbones/sites.py``). Each layer runs on its own device
        (``backbones/devices.py``); its edits get the tensor and the batch on that device. With
        ``cache`` (a transformers ``Cache``), the layers also store their keys and values in it."""
        dev = self.device   # where the embeddings (and the stack's position modules) are
        h0, kwargs = self.stack.prepare(batch.inputs_embeds.to(dev), batch.attention_mask.to(dev), cache=cache)
        return self._layers(h0 if hidden is None else hidden, kwargs, start, stop, layer_edits, batch)

    def _layers(self, h, kwargs: dict, start: int, stop: int, layer_edits, batch: VLBatch | None):
        kwargs, per_layer = PerDevice(kwargs), edits_by_layer(layer_edits)
        for i in range(start, stop):
            dev = module_device(self.stack.layers[i])
            edits = per_layer.get(i, {})
            h = self.stack.run_layer(i, h.to(dev), kwargs.on(dev), edits,
                                     batch.to(dev) if edits and batch is not None else batch)
        return h

    def logits(self, batch: VLBatch, layer_edits: dict[int, LayerEdit] | None = None) -> torch.Tensor:
        """Full forward: [B, L, V] logits, with optional edits on decoder-layer outputs."""
        return self.stack.head(self._run(batch, 0, self.num_layers, layer_edits=layer_edits))

    def hidden_at(self, batch: VLBatch, layer: int) -> torch.Tensor:
        """Output of decoder layer ``layer`` (0-based), running only layers 0..layer."""
        return self._run(batch, 0, layer + 1)

    def hidden_states(self, batch: VLBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Outputs of several decoder layers in one pass (layers 0..max(layers) run once each)."""
        out, h, start = {}, None, 0
        for layer in sorted(set(layers)):
            h = out[layer] = self._run(batch, start, layer + 1, hidden=h)
            start = layer + 1
        return out

    def logits_from(self, hidden: torch.Tensor, batch: VLBatch, layer: int,
                    layer_edits: dict[int, LayerEdit] | None = None) -> torch.Tensor:
        """Logits given the output of decoder layer ``layer``: runs only layers layer+1.. and the head."""
        return self.stack.head(self._run(batch, layer + 1, self.num_layers, hidden, layer_edits))

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], max_new_tokens: int,
                 layer_edits: dict[int, LayerEdit] | None = None,
                 decoding_edits: dict[int, LayerEdit] | None = None) -> list[list[int]]:
        """Greedy decoding of a right-padded batch; stops at EOS per sample. Two ways, the same tokens:

        - with ``decoding_edits`` (``{}`` for the unedited model): the prompt runs once and each new
          token then runs alone against the layers' key / value cache. A decoding edit is called once
          on the prompt (with its batch) and then once per new token (``batch`` None, a [B, 1, D]
          tensor), so it must act on a position from the prompt and that position alone
          (``BaseEditor.decoding_edits``);
        - otherwise: a full forward with ``layer_edits`` per new token."""
        if decoding_edits is not None:
            return self._generate_cached(samples, max_new_tokens, decoding_edits)
        batch = self.encode(samples, with_targets=False)
        B, L, D = batch.inputs_embeds.shape
        grow = lambda t, v: torch.cat([t, t.new_full((B, max_new_tokens) + t.shape[2:], v)], 1)
        batch = replace(batch, input_ids=grow(batch.input_ids, self.pad_token_id),
                        inputs_embeds=grow(batch.inputs_embeds, 0), attention_mask=grow(batch.attention_mask, 0),
                        labels=grow(batch.labels, IGNORE))
        out = [[] for _ in range(B)]
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        rows = torch.arange(B, device=self.device)
        embed = self.model.get_input_embeddings()
        for _ in range(max_new_tokens):
            lengths = batch.lengths
            logits = self.logits(batch, layer_edits)   # on the LM head's device: gather there, bring back
            nxt = logits[rows.to(logits.device), (lengths - 1).to(logits.device)].argmax(-1).to(self.device)
            for b in alive.nonzero().flatten().tolist():
                out[b].append(int(nxt[b]))
            alive &= nxt != self.tokenizer.eos_token_id
            if not alive.any():
                break
            idx = rows[alive]
            batch.input_ids[idx, lengths[idx]] = nxt[idx]
            batch.inputs_embeds[idx, lengths[idx]] = embed(nxt[idx]).to(batch.inputs_embeds.dtype)
            batch.attention_mask[idx, lengths[idx]] = 1
        return out

    def _generate_cached(self, samples, max_new_tokens: int, decoding_edits) -> list[list[int]]:
        from transformers import DynamicCache
        batch = self.encode(samples, with_targets=False)
        B = batch.input_ids.shape[0]
        lengths, rows = batch.lengths, torch.arange(B, device=self.device)
        cache = DynamicCache()
        logits = self.stack.head(self._run(batch, 0, self.num_layers, layer_edits=decoding_edits, cache=cache))
        last = logits[rows.to(logits.device), (lengths - 1).to(logits.device)]
        mask, embed = batch.attention_mask, self.model.get_input_embeddings()
        out = [[] for _ in range(B)]
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            nxt = last.argmax(-1).to(self.device)
            for b in alive.nonzero().flatten().tolist():
                out[b].append(int(nxt[b]))
            alive &= nxt != self.tokenizer.eos_token_id
            if not alive.any() or step == max_new_tokens - 1:
                break
            # every sample appends at the cache's next slot; its padding stays masked, and its
            # position is its own length + step (what the full forward gives that token)
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            h, kwargs = self.stack.prepare(embed(nxt)[:, None].to(batch.inputs_embeds.dtype), mask, cache=cache,
                                           position_ids=(lengths + step)[:, None])
            last = self.stack.head(self._layers(h, kwargs, 0, self.num_layers, decoding_edits, None))[:, -1]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
