"""PuLID's ID attention as the reference computes it, re-stated for the tests of both tiers (ToTheBeginning/PuLID
``pulid/attention_processor.py`` ``IDAttnProcessor2_0``): a diffusers attention processor, written independently of
the pack's patch."""
import torch
import torch.nn.functional as F


class RefIDProcessor:
    """attention_processor.py IDAttnProcessor2_0, re-stated: text attention, ID attention over
    cat(id_embedding, zeros[num_zero]), then none / ortho / ortho_v2 in float32."""

    def __init__(self, layer, id_embedding, scale, projection, num_zero):
        self.layer, self.e, self.scale, self.projection, self.num_zero = layer, id_embedding, scale, projection, num_zero

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = q.shape[-1] // attn.heads
        heads = lambda t: t.view(b, -1, attn.heads, d).transpose(1, 2)  # noqa: E731
        merge = lambda t: t.transpose(1, 2).reshape(b, -1, attn.heads * d)  # noqa: E731
        qh = heads(q)
        h = merge(F.scaled_dot_product_attention(qh, heads(k), heads(v)))
        e = self.e
        if self.num_zero:
            e = torch.cat([e, torch.zeros(e.shape[0], self.num_zero, e.shape[-1])], dim=1)
        kid, vid = heads(self.layer.id_to_k(e)), heads(self.layer.id_to_v(e))
        hid = merge(F.scaled_dot_product_attention(qh, kid, vid))
        if self.projection == "none":
            h = h + self.scale * hid
        else:
            proj = (h * hid).sum(-2, keepdim=True) / (h * h).sum(-2, keepdim=True) * h
            if self.projection == "ortho":
                h = h + self.scale * (hid - proj)
            else:
                a = (qh @ kid.transpose(-2, -1)).softmax(-1).mean(1)[:, :, :5].sum(-1, keepdim=True)
                h = h + self.scale * (hid + (a - 1) * proj)
        return attn.to_out[1](attn.to_out[0](h)) / attn.rescale_output_factor
