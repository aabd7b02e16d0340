"""MLServer 1.7.1 custom runtime serving a rankd model through RankdModel (numpy): the peer a team
would deploy on MLServer. Model settings parameters: uri = a directory holding model.rkm and
inspect.json (`rankd-tool inspect --json model.rkm`)."""
import os

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from rankd_model import RankdModel, columns_from_tensors


class RankdRuntime(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        self.model = RankdModel(os.path.join(uri, "inspect.json"), os.path.join(uri, "model.rkm"))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensors = []
        for inp in payload.inputs:
            if inp.datatype == "BYTES":
                values = StringCodec.decode_input(inp)
            else:
                values = NumpyCodec.decode_input(inp).reshape(-1).tolist()
            tensors.append((inp.name, list(inp.shape), values))
        cols, n = columns_from_tensors(tensors)
        scores = self.model.score(cols, n)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[ResponseOutput(name="score", shape=[n], datatype="FP32",
                                    data=scores.tolist())],
        )
