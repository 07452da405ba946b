"""Config of `humanalign tiny-model`: the small Llama-architecture model built locally, tokenizer included."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from humanalign.config.base import ConfigBase


class TinyModelConfig(ConfigBase):
    """Sizes and seed of the tiny model; the defaults are the embedded model the demo and the tests use."""

    output_fields: ClassVar[dict[str, str]] = {"output_dir": "folder"}

    output_dir: str = Field("models/tiny", description="Folder to write the model into (HF format, safetensors).")
    overwrite: bool = Field(False, description="Replace output_dir if it already holds files.")
    corpus: str | None = Field(
        None,
        description="Text to train the tokenizer on: a .txt file (one text per line) or a .jsonl/.json/.parquet "
        "file (every string field is used). Default: the demo data set's texts.",
    )
    vocab_size: int = Field(2048, ge=300, description="Target tokenizer vocabulary (256 bytes + merges + 3 specials).")
    hidden_size: int = Field(64, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(2, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention (query) heads; must divide hidden_size.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention); must divide num_heads.")
    intermediate_size: int = Field(192, ge=1, description="Width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(512, ge=16, description="Longest sequence the model is built for.")
    seed: int = Field(0, description="Seed of the weight initialisation (same seed, same bytes).")
    vision: bool = Field(False, description="Build the tiny vision-language model (LLaVA-style: a tiny CLIP "
                         "vision tower + projector + this text model, with a processor) instead of the text model.")

    @model_validator(mode="after")
    def _check_heads(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        return self
