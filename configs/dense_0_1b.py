"""Dense baseline with the shapes of GLaM (0.1bB/64E): every FFN dense, no experts."""

import ml_collections

from configs import glam


def get_config() -> ml_collections.ConfigDict:
    config = glam.get_config("0_1b")
    config.moe.num_experts = 0  # all layers dense: the activated-FLOPs twin of the MoE model
    config.paper.name = "dense twin of " + config.paper.name
    config.paper.total_params = config.paper.activated_params
    return config
