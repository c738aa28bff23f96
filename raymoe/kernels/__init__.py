"""Expert banks: the experts of one shard as stacked tensors, computed many at once."""

from raymoe.kernels.bank import BANKS, ExpertBank, expert_bytes, make_bank, seeded_bank
from raymoe.kernels.ffn import FFNBank
from raymoe.kernels.peer import PeerBank

__all__ = ["BANKS", "ExpertBank", "FFNBank", "PeerBank", "expert_bytes", "make_bank", "seeded_bank"]
