from .official import (ConversionError, check_fits, convert_official, detect,
                       merging_to_unfold_order, target_config)

__all__ = [
    'ConversionError', 'convert_official', 'detect', 'check_fits', 'target_config',
    'merging_to_unfold_order'
]
