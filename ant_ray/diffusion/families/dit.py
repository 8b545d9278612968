import torch
from torch import nn

from .base import MODEL_FAMILIES, ModelFamily


@MODEL_FAMILIES.register("dit")
class DiTFamily(ModelFamily):
    """diffusers DiTTransformer2DModel (Peebles & Xie 2023): patchify, `depth` adaLN-Zero blocks of `width`
    channels and `heads` heads, class labels through the adaLN conditioning. Learned sigma = out_channels 2 x in.

    The label table has num_classes + 1 rows; the last, index num_classes, is the null label. diffusers'
    LabelEmbedding drops 10% of labels in train mode on its own, with the global RNG, independently in every block
    (each diffusers block has its own copy of the embedder) and again in the final layer; a fixed 0.1, not a config
    option. So `prepare` switches that dropout off and the loop drops labels once per sample with `drop_labels`, at
    the config's p_uncond (DiT's train.py uses 0.1). num_classes = 0 is an unconditional DiT: only the null row."""

    name = "dit"
    model_class_name = "DiTTransformer2DModel"
    feature_layout = "NLD"  # each block outputs [B, tokens, width]

    def model_class(self) -> type:
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel

    def model_config(self, preset: dict, *, resolution: int, channels: int, num_classes: int, learn_sigma: bool,
                     patch_size: int | None = None, depth: int | None = None, width: int | None = None,
                     heads: int | None = None) -> dict:
        patch = patch_size or preset["patch_size"]
        width, heads = width or preset["width"], heads or preset["heads"]
        if resolution % patch != 0:
            raise ValueError(f"data.resolution ({resolution}) must be divisible by model.patch_size ({patch})")
        if width % heads != 0:
            raise ValueError(f"model.width ({width}) must be divisible by model.heads ({heads})")
        return dict(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
                    out_channels=2 * channels if learn_sigma else channels, num_layers=depth or preset["depth"],
                    sample_size=resolution, patch_size=patch, num_embeds_ada_norm=num_classes)

    def initialize(self, model: nn.Module) -> None:
        """DiT's initialize_weights: xavier linears, the patch embedding like a linear, N(0, 0.02) label table and
        timestep MLP, and adaLN-Zero (every block's modulation and the output layer zero, so each block starts as
        the identity and the model predicts 0). DiT has one shared embedder; diffusers has one per block, so every
        block starts from the same embedder weights."""
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = model.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        first = model.transformer_blocks[0].norm1.emb
        nn.init.normal_(first.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(first.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(first.timestep_embedder.linear_2.weight, std=0.02)
        for block in model.transformer_blocks:
            block.norm1.emb.load_state_dict(first.state_dict())
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def prepare(self, model: nn.Module) -> nn.Module:
        from diffusers.models.embeddings import LabelEmbedding

        for module in model.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0  # the table keeps its null row: its size was fixed at construction
        return model

    def num_classes(self, model: nn.Module) -> int:
        return model.config.num_embeds_ada_norm

    def has_label_table(self, model: nn.Module) -> bool:
        return True  # even an unconditional DiT is called with a label: its null row

    def forward(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return model(x_t, t, class_labels=cond).sample

    def projection_places(self, model: nn.Module) -> list[str]:
        return [f"transformer_blocks.{index}" for index in range(len(model.transformer_blocks))]
