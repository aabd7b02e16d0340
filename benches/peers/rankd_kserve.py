"""KServe's Python model server (0.21) serving a rankd model through RankdModel (numpy): the peer
a team would deploy as a KServe InferenceService with a custom predictor.

    python rankd_kserve.py --model_name adult --model_dir DIR --http_port 8080 --grpc_port 8081

DIR holds model.rkm and inspect.json (`rankd-tool inspect --json model.rkm`)."""
import argparse
import os
import uuid

import kserve
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

from rankd_model import RankdModel, columns_from_tensors


class RankdKServe(Model):
    def __init__(self, name, model_dir):
        super().__init__(name)
        self.model = RankdModel(os.path.join(model_dir, "inspect.json"),
                                os.path.join(model_dir, "model.rkm"))
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        tensors = [(i.name, list(i.shape), i.as_numpy().reshape(-1).tolist()) for i in payload.inputs]
        cols, n = columns_from_tensors(tensors)
        scores = self.model.score(cols, n)
        out = InferOutput(name="score", shape=[n], datatype="FP32")
        out.set_data_from_numpy(scores, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out],
                             response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", required=True)
    args, _ = parser.parse_known_args()
    ModelServer().start([RankdKServe(args.model_name, args.model_dir)])
