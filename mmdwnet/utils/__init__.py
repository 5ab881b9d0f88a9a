from .summary import format_table, summarize_backbones

__all__ = ['summarize_backbones', 'format_table']
