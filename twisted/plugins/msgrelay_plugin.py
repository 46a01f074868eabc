# Registers `twistd msgrelay`; the options and service live in msgrelay.service.
from twisted.application.service import ServiceMaker

msgrelay = ServiceMaker(
    "msgrelay",
    "msgrelay.service",
    "A federated store-and-forward relay for end-to-end-encrypted messages.",
    "msgrelay",
)
