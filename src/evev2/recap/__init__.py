"""Re-captioning engine (DenseFusion++-style): dense captions for image shards, filtered, resumable, torchrun-aware."""

from evev2.recap.cli import recap_cli, run_recap
from evev2.recap.engine import Recaptioner, RecapSettings, collect_stats, format_stats
from evev2.recap.filters import FilterConfig, check_caption
from evev2.recap.hints import HINT_SOURCES, HintSource, get_hint_source, synth_truth_hint
from evev2.recap.image_hash import NearDuplicateIndex, dhash

__all__ = ["HINT_SOURCES", "FilterConfig", "HintSource", "NearDuplicateIndex", "RecapSettings", "Recaptioner",
           "check_caption", "collect_stats", "dhash", "format_stats", "get_hint_source", "recap_cli", "run_recap",
           "synth_truth_hint"]
