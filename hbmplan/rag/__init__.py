"""DH-RAG (Zhang et al., 2025, arXiv:2502.13847) as hbmplan's builder of long, stable shared prompts
for multi-turn RL rollouts; each module names the part of the paper's method it implements.

Needs the ``rag`` extra (``pip install hbmplan[rag]``: bm25s, scikit-learn); ``import hbmplan``
does not import this package. Nothing here downloads a model or data: lexical retrieval (BM25),
TF-IDF vectors and extractive defaults for the steps the paper gives to an LLM (summaries,
chain-of-thought steps, responses), each pluggable.
"""

try:
    import bm25s  # noqa: F401
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hbmplan.rag needs bm25s and scikit-learn: pip install 'hbmplan[rag]'"
    ) from exc

from hbmplan.rag.baselines import Baseline
from hbmplan.rag.clustering import Clusters, cluster
from hbmplan.rag.encoder import TextEncoder, TfidfEncoder
from hbmplan.rag.matching import MatchConfig, keyword_summary, match
from hbmplan.rag.pipeline import DHRAG, DHRAGConfig, TurnResult, extractive_response
from hbmplan.rag.prompt import BuiltPrompt, HashTokenizer, PromptBuilder, common_prefix
from hbmplan.rag.retrieval import BM25Retriever
from hbmplan.rag.store import HistoryEntry, HistoryStore
from hbmplan.rag.tracking import ChainTracker, TrackConfig, extractive_step
from hbmplan.rag.updating import UpdateConfig, evict, refresh

__all__ = [
    "DHRAG",
    "BM25Retriever",
    "Baseline",
    "BuiltPrompt",
    "ChainTracker",
    "Clusters",
    "DHRAGConfig",
    "HashTokenizer",
    "HistoryEntry",
    "HistoryStore",
    "MatchConfig",
    "PromptBuilder",
    "TextEncoder",
    "TfidfEncoder",
    "TrackConfig",
    "TurnResult",
    "UpdateConfig",
    "cluster",
    "common_prefix",
    "evict",
    "extractive_response",
    "extractive_step",
    "keyword_summary",
    "match",
    "refresh",
]
