"""Download an hf:// model into the model cache, once: the init container of every Ray pod
runs this (deploy/helm/lull/templates/_model.tpl) with Lull's image, whose workers.model_fetch
does the work, as for `lull up --model`. A pod that finds the files there skips; the head and
gateway pods fetch only the config and tokenizer files (LULL_MODEL_FILES=metadata). Pods that
start together share huggingface_hub's per-file locks in the cache folder."""

import os
import sys
from pathlib import Path

from workers.model_fetch import ModelFetchError, fetch_model

try:
    fetch_model(os.environ["LULL_MODEL_REPO"], os.environ["LULL_MODEL_REVISION"], Path(os.environ["LULL_MODEL_DIR"]),
                full=os.environ.get("LULL_MODEL_FILES", "all") == "all",
                fix="for a gated model, set modelCache.hfTokenSecret to a Secret with key hf-token; "
                    "check that the pods reach huggingface.co")
except ModelFetchError as error:
    sys.exit(str(error))
