"""Comparing a state dict with a model's."""
import torch


def state_dict_differences(state: dict, model: torch.nn.Module):
    """Keys of ``model`` missing from ``state``, keys of ``state`` the model does not have,
    and shared keys whose shapes differ (each sorted)."""
    own = getattr(model, 'module', model).state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    return missing, unexpected, mismatched
