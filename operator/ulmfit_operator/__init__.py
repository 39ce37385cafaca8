"""ULMFiT operator: the controller and the local runner. No torch import anywhere in here."""
