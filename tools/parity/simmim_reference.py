"""SimMIM reference in PyTorch (float64), written after the official microsoft/SimMIM model
code (models/swin_transformer.py, models/vision_transformer.py, models/simmim.py) and, for
SwinV2, microsoft/Swin-Transformer's models/swin_transformer_v2.py, with the same module trees
and state-dict keys. Used to make extra parity cases for configurations the
shared fixtures do not cover; `check_fixture` first proves it reproduces the shared cases."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def trunc_normal_(t, std=0.02):
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------- Swin
def window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows, ws, H, W):
    B = int(windows.shape[0] / (H * W / ws / ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def swin_index(ws):
    """Swin's `relative_position_index` for a `ws x ws` window, as the official modules build it."""
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
    cf = torch.flatten(coords, 1)
    rel = (cf[:, :, None] - cf[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


class WindowAttention(nn.Module):
    def __init__(self, dim, ws, heads, qkv_bias):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", swin_index(ws))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, N, N)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class SwinBlock(nn.Module):
    def __init__(self, dim, res, heads, ws, shift, mlp_ratio, qkv_bias):
        super().__init__()
        self.res = res
        if res <= ws:
            shift, ws = 0, res
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift > 0:
            img_mask = torch.zeros((1, res, res, 1))
            cnt = 0
            sl = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
            for h in sl:
                for w in sl:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mw = window_partition(img_mask, ws).view(-1, ws * ws)
            attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask)

    def shifted_window_attention(self, x):
        """Cyclic shift, window partition, attention, and back: `[B, L, C]` to `[B, L, C]`."""
        H = W = self.res
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        xw = window_partition(x, self.ws).view(-1, self.ws * self.ws, C)
        aw = self.attn(xw, mask=self.attn_mask).view(-1, self.ws, self.ws, C)
        x = window_reverse(aw, self.ws, H, W)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x.reshape(B, H * W, C)

    def forward(self, x):
        x = x + self.shifted_window_attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, res, dim):
        super().__init__()
        self.res = res
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def gather(self, x):
        """Each 2x2 neighbourhood's tokens side by side: `[B, L/4, 4C]`."""
        H = W = self.res
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return x.view(B, -1, 4 * C)

    def forward(self, x):
        return self.reduction(self.norm(self.gather(x)))


class BasicLayer(nn.Module):
    def __init__(self, dim, res, depth, heads, ws, mlp_ratio, qkv_bias, downsample,
                 block=None, merge=None):
        super().__init__()
        block = block or (lambda shift: SwinBlock(dim, res, heads, ws, shift, mlp_ratio, qkv_bias))
        merge = merge or PatchMerging
        self.blocks = nn.ModuleList([block(0 if i % 2 == 0 else ws // 2) for i in range(depth)])
        self.downsample = merge(res, dim) if downsample else None

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim, norm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class SwinForSimMIM(nn.Module):
    def __init__(self, c):
        super().__init__()
        dim, stages = c["embed_dim"], len(c["depths"])
        res = c["img_size"] // c["patch_size"]
        self.patch_embed = PatchEmbed(c["patch_size"], 3, dim, c["patch_norm"])
        self.ape = c["ape"]
        if self.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, res * res, dim))
            trunc_normal_(self.absolute_pos_embed)
        self.layers = nn.ModuleList([
            BasicLayer(dim * 2 ** i, res // 2 ** i, c["depths"][i], c["num_heads"][i],
                       c["window_size"], c["mlp_ratio"], c["qkv_bias"], i < stages - 1)
            for i in range(stages)])
        self.num_features = dim * 2 ** (stages - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(_init_weights)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token)

    def forward(self, x, mask):
        x = self.patch_embed(x)
        B, L, _ = x.shape
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(B, L, -1) * w
        if self.ape:
            x = x + self.absolute_pos_embed
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x).transpose(1, 2)
        H = W = int(L ** 0.5) // 2 ** (len(self.layers) - 1)
        return x.reshape(B, -1, H, W)


class PatchExpand(nn.Module):
    """Swin-Unet's patch expanding: Linear(dim, 2 dim, bias=False), each token to a 2x2 block
    of dim/2 channels ('b h w (p1 p2 c) -> b (h p1) (w p2) c'), then LayerNorm(dim/2)."""

    def __init__(self, res, dim):
        super().__init__()
        self.res = res
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x):
        H = W = self.res
        B, L, C = x.shape
        x = self.expand(x).view(B, H, W, 2, 2, C // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, 4 * H * W, C // 2)
        return self.norm(x)


class DecoderLayer(nn.Module):
    def __init__(self, res, dim, depth, heads, ws, mlp_ratio, qkv_bias):
        super().__init__()
        self.upsample = PatchExpand(res // 2, dim * 2)
        self.blocks = nn.ModuleList([
            SwinBlock(dim, res, heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio, qkv_bias)
            for i in range(depth)])

    def forward(self, x):
        x = self.upsample(x)
        for b in self.blocks:
            x = b(x)
        return x


class InverseSwin(nn.Module):
    """The paper's inverse Swin head: the encoder's stages in reverse, a patch expanding where
    the encoder merges, then LayerNorm and a 1x1 conv + pixel shuffle at the patch grid."""

    def __init__(self, c, depths, stride):
        super().__init__()
        dim, stages = c["embed_dim"], len(c["depths"])
        self.res = c["img_size"] // c["patch_size"]
        self.layers = nn.ModuleList([
            DecoderLayer(self.res // 2 ** s, dim * 2 ** s, depths[i], c["num_heads"][s],
                         c["window_size"], c["mlp_ratio"], c["qkv_bias"])
            for i, s in enumerate(reversed(range(stages - 1)))])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Conv2d(dim, stride ** 2 * 3, 1)
        self.shuffle = nn.PixelShuffle(stride)
        self.apply(_init_weights)

    def forward(self, z):
        B = z.shape[0]
        x = z.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x).transpose(1, 2).reshape(B, -1, self.res, self.res)
        return self.shuffle(self.head(x))


# ---------------------------------------------------------------- SwinV2
class WindowAttentionV2(nn.Module):
    """Scaled cosine attention with a continuous position bias (`cpb_mlp` over log-spaced
    coordinates normalised by the pretrained window), q and v biases, no k bias."""

    def __init__(self, dim, ws, heads, qkv_bias, pretrained_ws):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, heads, bias=False))
        span = torch.arange(-(ws - 1), ws, dtype=torch.float32)
        table = torch.stack(torch.meshgrid([span, span], indexing="ij")).permute(1, 2, 0)
        table = table.contiguous().unsqueeze(0)
        norm = pretrained_ws if pretrained_ws > 0 else ws
        table[:, :, :, 0] /= norm - 1
        table[:, :, :, 1] /= norm - 1
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
        self.register_buffer("relative_coords_table", table.to(torch.get_default_dtype()))
        self.register_buffer("relative_position_index", swin_index(ws))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False),
                              self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(B_, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.heads)
        rpb = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(rpb.contiguous()).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, N, N)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class SwinBlockV2(SwinBlock):
    """v1's block geometry (clipped window, shift mask) with res-post-norm: the norms after
    attention and after the MLP, inside the residual."""

    def __init__(self, dim, res, heads, ws, shift, mlp_ratio, qkv_bias, pretrained_ws):
        super().__init__(dim, res, heads, ws, shift, mlp_ratio, qkv_bias)
        self.attn = WindowAttentionV2(dim, self.ws, heads, qkv_bias, pretrained_ws)

    def forward(self, x):
        x = x + self.norm1(self.shifted_window_attention(x))
        return x + self.norm2(self.mlp(x))


class PatchMergingV2(PatchMerging):
    """v2 merges then norms the 2C result."""

    def __init__(self, res, dim):
        super().__init__(res, dim)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):
        return self.norm(self.reduction(self.gather(x)))


def basic_layer_v2(dim, res, depth, heads, ws, mlp_ratio, qkv_bias, downsample, pretrained_ws):
    block = lambda shift: SwinBlockV2(dim, res, heads, ws, shift, mlp_ratio, qkv_bias,  # noqa: E731
                                      pretrained_ws)
    return BasicLayer(dim, res, depth, heads, ws, mlp_ratio, qkv_bias, downsample, block,
                      PatchMergingV2)


class SwinV2ForSimMIM(SwinForSimMIM):
    """`SwinTransformerV2ForSimMIM`: v1's embedding, masking and final norm around v2 stages,
    every block's res-post-norm initialised to zero (`_init_respostnorm`)."""

    def __init__(self, c):
        super().__init__(c)
        dim, stages = c["embed_dim"], len(c["depths"])
        res = c["img_size"] // c["patch_size"]
        pretrained = c.get("pretrained_window_sizes") or [0] * stages
        self.layers = nn.ModuleList([
            basic_layer_v2(dim * 2 ** i, res // 2 ** i, c["depths"][i], c["num_heads"][i],
                           c["window_size"], c["mlp_ratio"], c["qkv_bias"], i < stages - 1,
                           pretrained[i])
            for i in range(stages)])
        self.layers.apply(_init_weights)
        for layer in self.layers:
            for blk in layer.blocks:
                for norm in (blk.norm1, blk.norm2):
                    nn.init.constant_(norm.weight, 0)
                    nn.init.constant_(norm.bias, 0)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


# ---------------------------------------------------------------- ViT (BEiT style)
def beit_index(grid):
    n_rel = (2 * grid - 1) ** 2 + 3
    patches = swin_index(grid)  # BEiT indexes patch pairs as Swin does a window's
    idx = torch.zeros((grid * grid + 1,) * 2, dtype=patches.dtype)
    idx[1:, 1:] = patches
    idx[0, 0:] = n_rel - 3
    idx[0:, 0] = n_rel - 2
    idx[0, 0] = n_rel - 1
    return n_rel, idx


class RelativePositionBias(nn.Module):
    def __init__(self, grid, heads):
        super().__init__()
        n_rel, idx = beit_index(grid)
        self.n = grid * grid + 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, heads))
        self.register_buffer("relative_position_index", idx)

    def forward(self):
        b = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return b.view(self.n, self.n, -1).permute(2, 0, 1).contiguous()


class VitAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias, grid):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if grid is not None:
            n_rel, idx = beit_index(grid)
            self.n = grid * grid + 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, heads))
            self.register_buffer("relative_position_index", idx)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rel_pos_bias=None):
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            b = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            attn = attn + b.view(self.n, self.n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class VitBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qkv_bias, init_values, grid):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VitAttention(dim, heads, qkv_bias, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if init_values is not None and init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, rel_pos_bias=None):
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x), rel_pos_bias)
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class VitForSimMIM(nn.Module):
    def __init__(self, c):
        super().__init__()
        dim, grid = c["embed_dim"], c["img_size"] // c["patch_size"]
        self.patch_embed = PatchEmbed(c["patch_size"], 3, dim, False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim)) if c["use_ape"] else None
        self.rel_pos_bias = RelativePositionBias(grid, c["num_heads"]) if c["use_shared_rpb"] else None
        self.blocks = nn.ModuleList([
            VitBlock(dim, c["num_heads"], c["mlp_ratio"], c["qkv_bias"], c["init_values"],
                     grid if c["use_rpb"] else None)
            for _ in range(c["depth"])])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed)
        trunc_normal_(self.cls_token)
        self.apply(_init_weights)
        for i, b in enumerate(self.blocks):
            b.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            b.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token)
        # Non-zero tables, so the bias paths are exercised by the gradients.
        for name, p in self.named_parameters():
            if "relative_position_bias_table" in name:
                trunc_normal_(p)

    def forward(self, x, mask):
        x = self.patch_embed(x)
        B, L, _ = x.shape
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(B, L, -1) * w
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rpb = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for b in self.blocks:
            x = b(x, rel_pos_bias=rpb)
        x = self.norm(x)[:, 1:]
        H = W = int(L ** 0.5)
        return x.permute(0, 2, 1).reshape(B, -1, H, W)


def norm_targets(targets, patch_size):
    """microsoft/Swin-Transformer's SimMIM `norm_targets`, as written there."""
    assert patch_size % 2 == 1
    targets_count = torch.ones_like(targets)
    targets_square = targets ** 2.
    pad = patch_size // 2
    targets_mean = F.avg_pool2d(targets, kernel_size=patch_size, stride=1, padding=pad,
                                count_include_pad=False)
    targets_square_mean = F.avg_pool2d(targets_square, kernel_size=patch_size, stride=1,
                                       padding=pad, count_include_pad=False)
    targets_count = F.avg_pool2d(targets_count, kernel_size=patch_size, stride=1, padding=pad,
                                 count_include_pad=True) * (patch_size ** 2)
    targets_var = (targets_square_mean - targets_mean ** 2.) * (targets_count / (targets_count - 1))
    targets_var = torch.clamp(targets_var, min=0.)
    return (targets - targets_mean) / (targets_var + 1.e-6) ** 0.5


class SimMIM(nn.Module):
    """The official SimMIM wrapper, with the paper's ablations as case fields:
    `head` {kind: linear|mlp, hidden}, `loss` {kind: l1|smooth_l1|l2, beta, area: masked|all,
    target_resolution, norm_target: {window}}. Absent fields are the official defaults."""

    def __init__(self, c):
        super().__init__()
        encoders = {"swin": SwinForSimMIM, "swinv2": SwinV2ForSimMIM, "vit": VitForSimMIM}
        self.encoder = encoders[c["type"]](c)
        feats = self.encoder.num_features if c["type"] != "vit" else c["embed_dim"]
        self.loss_spec = dict(c.get("loss") or {})
        head = dict(c.get("head") or {})
        kind = head.get("kind", "linear")
        grid = c["img_size"] // (c["patch_size"] if kind == "inverse_swin" else c["encoder_stride"])
        side = self.loss_spec.get("target_resolution") or c["img_size"]
        stride = side // grid
        if kind == "inverse_swin":
            stages = len(c["depths"])
            depths = head.get("depths") or list(reversed(c["depths"][:stages - 1]))
            self.decoder = InverseSwin(c, depths, stride)
        elif kind == "linear":
            self.decoder = nn.Sequential(nn.Conv2d(feats, stride ** 2 * 3, 1), nn.PixelShuffle(stride))
        else:
            hidden = head.get("hidden") or feats
            self.decoder = nn.Sequential(nn.Conv2d(feats, hidden, 1), nn.GELU(),
                                         nn.Conv2d(hidden, stride ** 2 * 3, 1), nn.PixelShuffle(stride))
        self.patch_size = c["patch_size"]

    def forward(self, x, mask):
        x_rec = self.decoder(self.encoder(x, mask))
        spec = self.loss_spec
        if spec.get("area", "masked") == "masked":
            m = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
            m = m.unsqueeze(1).contiguous().type_as(x)
        else:
            m = torch.ones_like(x[:, :1])
        if x_rec.shape[-1] != x.shape[-1]:
            f = x.shape[-1] // x_rec.shape[-1]
            x = F.avg_pool2d(x, f, f)
            m = F.avg_pool2d(m, f, f)
        if spec.get("norm_target"):
            x = norm_targets(x, spec["norm_target"].get("window", 47))
        kind = spec.get("kind", "l1")
        if kind == "l1":
            per = F.l1_loss(x, x_rec, reduction="none")
        elif kind == "l2":
            per = F.mse_loss(x, x_rec, reduction="none")
        else:
            per = F.smooth_l1_loss(x, x_rec, reduction="none", beta=spec.get("beta", 1.0))
        loss = (per * m).sum() / (m.sum() + 1e-5) / 3
        return loss, x_rec


NO_DECAY_KEYWORDS = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed",
                     "cls_token", "mask_token")
# SwinV2's keywords as the official pretraining optimizer sees them: SimMIM prefixes them
# with "encoder.", so "encoder.cpb_mlp" and "encoder.logit_scale" match no parameter name
# and the position-bias MLP's weights and the logit scales take weight decay.
PRETRAIN_V2_KEYWORDS = ("encoder.cpb_mlp", "encoder.logit_scale")


def param_groups(model):
    decay, no_decay = [], []
    keywords = NO_DECAY_KEYWORDS + PRETRAIN_V2_KEYWORDS
    for name, p in model.named_parameters():
        if p.ndim == 1 or name.endswith(".bias") or any(k in name for k in keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return decay, no_decay
