import json

import numpy as np

from demo.results import Hit
from teran_api._proto import search_pb2
from teran_api.search_messages import search_result_from_proto


def received(message: search_pb2.SearchHit):
    """The hit as the typed client returns it (teran_api.types.SearchHit)."""
    return search_result_from_proto(search_pb2.SearchResponse(hits=[message], target=search_pb2.IMAGE)).hits[0]


def test_hit_from_search_hit_reads_whole_words_and_strongest_matches():
    message = search_pb2.SearchHit(id="x.jpg", score=1.5, first_stage_score=0.4, metadata_json=json.dumps({"caption": "a red dog"}))
    # One entry per content word of the caption side; word_piece only holds the first piece.
    for index, (word, piece, pieces, similarity) in enumerate(
        [("frisbee", "fr", [0, 1, 2], 0.9), ("red", "red", [3], 0.2), ("dog", "dog", [4], 0.5), ("near", "near", [5], -0.1)]
    ):
        message.alignment.add(
            word_index=pieces[0],
            word_piece=piece,
            word=word,
            piece_indices=pieces,
            region_index=index + 3,
            box=[0.1, 0.2, 0.3, 0.4],
            similarity=similarity,
        )
    hit = Hit.from_search_hit(received(message))
    assert hit.id == "x.jpg" and hit.metadata == {"caption": "a red dog"} and np.isclose(hit.first_stage, 0.4)
    assert [m.word for m in hit.matches] == ["frisbee", "red", "dog", "near"]  # whole words, nothing filtered here
    assert [m.word for m in hit.strongest_matches(2)] == ["frisbee", "dog"]
    assert [m.word for m in hit.strongest_matches(10)] == ["frisbee", "dog", "red", "near"]
    assert hit.matches[1].region == 4 and np.isclose(hit.matches[0].similarity, 0.9)
    np.testing.assert_allclose(hit.matches[1].box, [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_hit_without_alignment_or_boxes():
    message = search_pb2.SearchHit(id="y.jpg#2", score=0.3)
    message.alignment.add(word="dog", word_piece="dog", region_index=1, similarity=0.3)  # an image without boxes
    hit = Hit.from_search_hit(received(message))
    assert hit.metadata == {} and hit.matches[0].box.shape == (0,)
    assert Hit.from_search_hit(received(search_pb2.SearchHit(id="z"))).strongest_matches(3) == []
