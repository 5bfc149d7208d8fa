"""TERAN search gRPC service (teran.v1.SearchService): Milvus storage, dense first stage, MrSw re-rank.

No torch at run time: numpy (teran.alignment_numpy), grpcio, pymilvus.
"""
