"""Text encoding through ComfyUI's own CLIP, with a trainable token [V] in the slots ComfyUI's tokenizer gives it."""
from __future__ import annotations

import folder_paths
import torch

from ...training import conditioning, export


def _keep_inference_or_clone(t):
    return t if t.is_inference() else t.clone()


def _same(t):
    return t


class ComfyTextEncoder:
    """``encode(prompts, token) -> conditioning`` over a ComfyUI CLIP, as the training core expects.

    Without a token: ComfyUI's own encode under no_grad (the trainer caches it). With one: the prompt names the
    trained embedding as ``embedding:<name>``; the embedding file is written first (:meth:`write_embedding`), so
    ComfyUI's tokenizer puts its vectors exactly where a prompt at inference puts them; those vectors are then
    swapped for rows of the trainable token and the text encoder runs with autograd. ComfyUI's CLIP adds residuals
    in place and its weights are inference tensors, so the activations autograd saves are cloned as they are saved
    (the weights, never modified, are kept as they are).

    The token is ``(n_vectors, sum of widths)``: each text encoder's part side by side (:attr:`parts`; SDXL:
    CLIP-G then CLIP-L in the tokenizer's key order). ``adm``: ``pooled -> y`` for SDXL (the conditioning is then
    ``(context, y)``)."""

    def __init__(self, clip, adm=None):
        self.clip, self.adm = clip, adm
        cs = clip.cond_stage_model
        self.parts = []
        for key in clip.tokenize(""):
            encoder = getattr(cs, f"clip_{key}", None)
            if encoder is None or not hasattr(encoder, "transformer"):
                raise ValueError(f"token training needs CLIP text encoders; {type(cs).__name__} has no 'clip_{key}'")
            self.parts.append((key, encoder.transformer.get_input_embeddings().weight.shape[1]))
        self._written: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, tuple] = {}

    @property
    def file_parts(self) -> list[tuple[str, int]]:
        """The embedding file's keys (``clip_l``, ``clip_g``: the keys ComfyUI's tokenizers look up) and widths."""
        return [(f"clip_{k}", w) for k, w in self.parts]

    def _split(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for key, width in self.parts:
            out[key] = vectors[:, start:start + width]
            start += width
        return out

    def word_embedding(self, word: str) -> torch.Tensor:
        """``(1, width)``: the mean input embedding of ``word``'s tokens, per text encoder (a new token's start)."""
        tokens = self.clip.tokenize(word, return_word_ids=True)
        cs, vecs = self.clip.cond_stage_model, []
        for key, _ in self.parts:
            ids = [int(t) for t, _, wid in tokens[key][0] if wid != 0]
            if not ids:
                raise ValueError(f"the class word {word!r} gives no tokens")
            table = getattr(cs, f"clip_{key}").transformer.get_input_embeddings().weight
            vecs.append(table[ids].detach().float().mean(0).cpu())
        return torch.cat(vecs)[None].clone()

    def write_embedding(self, vectors: torch.Tensor, path: str, metadata=None, overwrite: bool = False) -> None:
        """Save ``vectors`` where ComfyUI's tokenizer finds them (``embedding:<file name>``)."""
        export.save_embedding(vectors, path, metadata, parts=self.file_parts, overwrite=overwrite)
        self._written = {k: v.detach().float().cpu().clone() for k, v in self._split(vectors).items()}

    def _conditioning(self, cond, pooled):
        cond = cond.float()
        return cond if self.adm is None else (cond, self.adm(pooled.float()))

    def _plain(self, prompt: str):
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            out = self._conditioning(cond, pooled)
        return tuple(c.detach().clone() for c in out) if isinstance(out, tuple) else out.detach().clone()

    def _slots(self, prompt: str):
        """ComfyUI's tokens of ``prompt`` and where the written embedding's vectors are: ``(key, section, index,
        row)``."""
        if prompt not in self._tokens:
            tokens = self.clip.tokenize(prompt)
            slots = []
            for key, _ in self.parts:
                for si, section in enumerate(tokens[key]):
                    for idx, entry in enumerate(section):
                        if not torch.is_tensor(entry[0]) or key not in self._written:
                            continue
                        rows = [r for r, v in enumerate(self._written[key]) if torch.equal(entry[0].float().cpu(), v)]
                        if rows:
                            slots.append((key, si, idx, rows[0]))
            if not slots:
                raise ValueError(f"the prompt {prompt!r} names no trained embedding that ComfyUI's tokenizer found "
                                 f"(embeddings folders: {folder_paths.get_folder_paths('embeddings')}); write it with "
                                 "write_embedding first")
            self._tokens[prompt] = (tokens, slots)
        return self._tokens[prompt]

    def _with_token(self, prompt: str, token: torch.Tensor):
        tokens, slots = self._slots(prompt)
        tokens = {k: [list(section) for section in v] for k, v in tokens.items()}
        parts = self._split(token)
        for key, si, idx, row in slots:
            entry = tokens[key][si][idx]
            tokens[key][si][idx] = (parts[key][row],) + tuple(entry[1:])
        cs = self.clip.cond_stage_model
        cs.reset_clip_options()  # as CLIP.encode_from_tokens, without its load_model (the trainer loaded it)
        if self.clip.layer_idx is not None:
            cs.set_clip_options({"layer": self.clip.layer_idx})
        with torch.autograd.graph.saved_tensors_hooks(_keep_inference_or_clone, _same):
            cond, pooled = cs.encode_token_weights(tokens)[:2]
            return self._conditioning(cond, pooled)

    def __call__(self, prompts, token):
        return conditioning.cat([self._plain(p) if token is None else self._with_token(p, token) for p in prompts])


# ---------------------------------------------------------------------------------------------------------------
# A word embedding in a placeholder's slot (E4T)


def sd1_text_encoder(clip, width: int):
    """``(tokenizer, encoder)`` of an SD1.x CLIP (one CLIP-L text encoder of ``width``), else a clear error."""
    tok, enc = getattr(clip.tokenizer, "clip_l", None), getattr(clip.cond_stage_model, "clip_l", None)
    keys = list(clip.tokenize(""))
    if tok is None or enc is None or keys != ["l"]:
        raise ValueError(f"E4T needs the SD1.x text encoder (one CLIP-L); this CLIP has {keys} "
                         f"({type(clip.cond_stage_model).__name__})")
    have = enc.transformer.get_input_embeddings().weight.shape[1]
    if have != width:
        raise ValueError(f"the text encoder is {have} wide, the E4T encoder makes {width}-wide word embeddings: "
                         "use the CLIP of the SD1.x checkpoint the E4T weights were made for")
    return tok, enc


def word_embedding_of(clip, word: str, width: int) -> torch.Tensor:
    """``(width,)``: the input embedding of a class word that is one token (the reference asserts one token)."""
    tok, enc = sd1_text_encoder(clip, width)
    ids = tok.tokenizer(word)["input_ids"][1:-1]
    if len(ids) != 1:
        raise ValueError(f"the class word {word!r} is {len(ids)} tokens for this tokenizer; E4T's class word must be "
                         "one token (e.g. face, cat)")
    return enc.transformer.get_input_embeddings().weight[ids[0]].detach().float().cpu().clone()


class SlotPrompt:
    """ComfyUI's tokens of a prompt with one placeholder, whose slot takes a word embedding per batch row.

    The text left and right of the placeholder is tokenized by ComfyUI's own tokenizer (prompt weights and
    ``embedding:`` names work there; the placeholder must not sit inside a weighted group); the rows are
    [start] + left + [slot] + right + [end] + padding, one 77-token section, the slot holding one vector (the
    reference adds the placeholder as one new token). Weighted tokens are interpolated against the empty prompt as
    ComfyUI's ``encode_token_weights`` does."""

    def __init__(self, clip, prompt: str, placeholder: str, width: int):
        self.clip = clip
        self.tok, self.encoder = sd1_text_encoder(clip, width)
        count = prompt.count(placeholder)
        if count != 1:
            raise ValueError(f"the prompt must name the subject once with the placeholder {placeholder!r} (e.g. 'a photo "
                             f"of {placeholder} as a painting'); it holds it {count} times")
        left, right = prompt.split(placeholder)
        body_l, body_r = self._body(left), self._body(right)
        tok = self.tok
        self.items = [(tok.start_token, 1.0)] + body_l + [(None, 1.0)] + body_r + [(tok.end_token, 1.0)]
        if len(self.items) > tok.max_length:
            raise ValueError(f"the prompt is {len(self.items)} tokens; E4T prompts fit one section of {tok.max_length} "
                             "(the reference's limit): shorten it")
        self.items += [(tok.pad_token, 1.0)] * (tok.max_length - len(self.items))
        self.slot = 1 + len(body_l)
        self.weighted = any(w != 1.0 for _, w in self.items)

    def _body(self, text: str) -> list:
        if not text.strip():
            return []
        sections = self.tok.tokenize_with_weights(text)
        tok = self.tok
        out = []
        for section in sections:
            entries = [(t, w) for t, w, *_ in section]
            if entries and entries[0][0] == tok.start_token:
                entries = entries[1:]
            for t, w in entries:
                if not torch.is_tensor(t) and t == tok.end_token:
                    break
                out.append((t, w))
        return out

    def rows(self, e: torch.Tensor) -> list[list]:
        return [[e[i] if t is None else t for t, _ in self.items] for i in range(e.shape[0])]

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        """``(B, 77, width)`` for ``e`` ``(B, width)`` (with autograd to ``e`` when grad is on: the activations ComfyUI's
        CLIP adds in place are cloned as autograd saves them). The CLIP must be loaded (a companion of the UNet)."""
        cs = self.clip.cond_stage_model
        cs.reset_clip_options()  # as CLIP.encode_from_tokens, without its model load (done with the UNet)
        if self.clip.layer_idx is not None:
            cs.set_clip_options({"layer": self.clip.layer_idx})
        rows = self.rows(e)
        if self.weighted:
            rows.append([self.tok.start_token, self.tok.end_token] + [self.tok.pad_token] * (self.tok.max_length - 2))
        with torch.autograd.graph.saved_tensors_hooks(_keep_inference_or_clone, _same):
            z = self.encoder.encode(rows)[0]
        if not self.weighted:
            return z
        z, empty = z[:-1], z[-1:]
        w = torch.tensor([w for _, w in self.items], device=z.device, dtype=z.dtype).reshape(1, -1, 1)
        return (z - empty) * w + empty


@torch.no_grad()
def plain_context(clip, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context (1, 77, width), pooled)`` of a prompt through ComfyUI's own encode (the empty prompt: the reference's
    negative and feature-pass context)."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return cond.detach().float().clone(), pooled.detach().float().clone()


def masked_conditioning(conditioning: list, mask: torch.Tensor, strength: float) -> list:
    """ComfyUI CONDITIONING confined to ``mask`` (ComfyUI's own ``conditioning_set_values`` with the mask, its
    strength, and no area: what the core "Conditioning (Set Mask)" node does with set_cond_area "default")."""
    import node_helpers

    return node_helpers.conditioning_set_values(conditioning, {"mask": mask, "set_area_to_bounds": False,
                                                               "mask_strength": float(strength)})
