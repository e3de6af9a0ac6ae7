"""The keys a `type: bedrock` instance takes besides the common ones (validated by the typed config)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BedrockSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str | None = Field(None, description="AWS region (default: $AWS_REGION / $AWS_DEFAULT_REGION)")
    model: str | None = Field(None, min_length=1, description="Bedrock model or inference profile id for requests")
    small_fast_model: str | None = Field(None, min_length=1, description="for the small/fast model (default: model)")
    client_signature: str = Field(
        "resign", description="resign: the gateway signs with the instance's credentials; keep: each user's own "
                              "AWS signature goes upstream")
    access_key: str | None = Field(None, description="AWS access key id (default: the AWS credential chain)")
    access_key_env: str | None = Field(None, description="the environment variable holding access_key")
    access_key_secret: str | None = Field(None, description="AWS secret access key (set with access_key)")
    access_key_secret_env: str | None = Field(None, description="the environment variable holding access_key_secret")
    session_token: str | None = Field(None, description="AWS session token of temporary credentials")
    session_token_env: str | None = Field(None, description="the environment variable holding session_token")

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", v):
            raise ValueError(f"an AWS region such as us-east-1 is required, got {v!r}")
        return v

    @field_validator("client_signature")
    @classmethod
    def _signature(cls, v: str) -> str:
        if v not in ("resign", "keep"):
            raise ValueError("must be 'resign' (the gateway signs with the instance's credentials) or 'keep' (each "
                             f"user's own AWS signature goes upstream), got {v!r}")
        return v
