"""The shapes of the service's JSON: request bodies (checked with pydantic) and responses (documented in
the OpenAPI schema at /docs). Field descriptions are the API's reference."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

IMAGE_HELP = ("the image file's bytes in base64 (PNG, JPEG, BMP, TIFF, WEBP, GIF, PPM), optionally as a "
              "data: URL; never a path or URL")
LABELS_HELP = ('"topK" (the K best classes), class indices or names (a list, or comma-separated text); '
               "default: the top class")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description=IMAGE_HELP)
    k: int = Field(5, description="how many classes, best first")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description=IMAGE_HELP)
    methods: Union[list[str], str] = Field("gradcam", description="method names or aliases (GET /v1/methods)")
    labels: Optional[Union[list[Union[int, str]], str]] = Field(None, description=LABELS_HELP)
    options: Optional[dict[str, dict[str, Any]]] = Field(
        None, description='{"method": {"option": value}}; text values are parsed as the CLI\'s --set')
    outputs: Optional[Union[list[str], str]] = Field(
        None, description="of maps (float16 arrays), overlays (map over image, PNG), heatmaps (map alone, PNG); "
                          "default: maps, overlays")
    alpha: float = Field(0.5, description="the overlays' map opacity in [0, 1]")
    cmap: str = Field("jet", description="matplotlib colormap of the PNGs")


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class ImageSize(BaseModel):
    height: int
    width: int


class ClassifyResponse(BaseModel):
    model: str
    image: ImageSize
    predictions: list[Prediction]
    timings: dict[str, float]


class Label(BaseModel):
    index: int
    label: str
    score: float = Field(description="the class probability of the image")


class Map(BaseModel):
    method: str
    label: Label
    shape: list[int] = Field(description="(height, width): the image's")
    dtype: str = Field("float16", description="of data")
    min: float
    max: float
    data: Optional[str] = Field(None, description="the map: base64 of little-endian float16, row-major")
    overlay_png: Optional[str] = Field(None, description="base64 PNG: the map's colours over the image")
    heatmap_png: Optional[str] = Field(None, description="base64 PNG: the map's colours alone")


class ExplainResponse(BaseModel):
    model: str
    image: ImageSize
    labels: list[Label]
    maps: list[Map]
    timings: dict[str, Any] = Field(description="seconds: decode, labels, queue, each method, encode, total")


class ErrorBody(BaseModel):
    type: str = Field(description="the library's error class (InvalidParameterError, ...) or the HTTP reason")
    message: str
    status: int


class ErrorResponse(BaseModel):
    error: ErrorBody


def multipart_schema(fields: dict[str, str]) -> dict:
    """The OpenAPI requestBody of an endpoint that takes a multipart upload or the same fields as JSON."""
    return {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary", "description": "the image file"},
                       **{name: {"type": "string", "description": help} for name, help in fields.items()}}}}}
