"""Build the network a plans file describes and print its true parameter counts."""

from __future__ import annotations

from nnunet_mtl.model.network import MultiTaskUNet, parameter_counts


def network_from_plans(plans: dict, configuration: str = "3d_fullres", input_channels: int = 1,
                       segmentation_classes: int = 3) -> MultiTaskUNet:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, input_channels, segmentation_classes,
                                     allow_init=False, deep_supervision=False)
    if not isinstance(network, MultiTaskUNet):
        raise TypeError(f"these plans describe {type(network).__name__}, not a multi-task network; "
                        "use the plans written by `nnunet-mtl plan` (*_MTL.json)")
    return network


def summary_table(network: MultiTaskUNet) -> str:
    counts = parameter_counts(network)
    features = list(network.encoder.output_channels)
    lines = [f"backbone: {network._backbone_class.__name__}, stages {len(features)}, features {features}",
             f"head: {network.head_kind}, subtypes {network.num_subtypes}", ""]
    lines += [f"{part:<8} {n:>12,}" for part, n in counts.items()]
    return "\n".join(lines)
