"""Effect of the batch-shared rule on Swin-V2-T (random weights, one 224x224 noise input, sparsity 0.7).

Compares the pathway of the shipped rule (the position-bias tables are shared by the batch: not
selectable, always kept) with the rule the engine used before for a batch of one (every call per sample:
the tables' neurons scored and thresholded with the rest). Prints JSON: how many neurons the tables hold,
their share of the contribution mass, and how much the map changes. ``python benchmarks/batch_kinds/swin_v2_shared_tables.py``
"""

import json
import time
from unittest import mock

import numpy as np
import torch
import torchvision

from handler.engine import Explainer
from handler.engine import sites as sites_module
from handler.engine.pathways import _abs_contribution, score_neurons

torch.set_num_threads(2)
torch.manual_seed(0)
model = torchvision.models.swin_v2_t(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
target = torch.tensor([3])


def run(per_sample_everywhere: bool) -> dict:
    real = sites_module.survey_sites
    if per_sample_everywhere:
        survey = lambda m, i: tuple((sites_module.PER_SAMPLE, 1, o) for _, _, o in real(m, i))  # noqa: E731
    else:
        survey = real
    with mock.patch.object(sites_module, "survey_sites", survey):
        with torch.enable_grad():
            scores, layout, *_ = score_neurons(model, x, target, _abs_contribution)
        tables = [s for s in layout.sites if s.name.endswith("cpb_mlp.1")]
        table_mass = float(sum(scores[:, s.offset:s.offset + s.numel].sum() for s in tables if s.numel))
        started = time.process_time()
        [e] = Explainer(model).explain(x, [3], sparsity=0.7)
        return {"neurons": layout.total, "table_neurons": sum(s.numel for s in tables),
                "table_score_share": table_mass / float(scores.sum()), "map": e.attribution,
                "kept_table_neurons": sum(s["kept"] for s in e.pathway["sites"] if s["name"].endswith("cpb_mlp.1")),
                "cpu_s": time.process_time() - started}


shared, per_sample = run(False), run(True)
a, b = shared.pop("map"), per_sample.pop("map")
print(json.dumps({"shared_rule": shared, "per_sample_rule": per_sample,
                  "map_correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                  "map_mean_abs_difference": float(np.abs(a - b).mean())}, indent=2))
