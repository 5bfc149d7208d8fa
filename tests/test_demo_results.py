import json

import numpy as np

from demo.results import Hit
from search_service._proto import search_pb2


def test_hit_from_search_hit_and_strongest_matches():
    message = search_pb2.SearchHit(id="x.jpg", score=1.5, first_stage_score=0.4, metadata_json=json.dumps({"caption": "a red dog"}))
    for index, (word, similarity) in enumerate([("the", 0.8), ("red", 0.2), ("##dish", 0.9), ("dog", 0.5)]):
        message.alignment.add(word_index=index, word_piece=word, region_index=index + 3, box=[0.1, 0.2, 0.3, 0.4], similarity=similarity)
    hit = Hit.from_search_hit(message)
    assert hit.id == "x.jpg" and hit.metadata == {"caption": "a red dog"} and np.isclose(hit.first_stage, 0.4)
    assert [m.word for m in hit.strongest_matches(2)] == ["dog", "red"]
    assert hit.matches[1].region == 4
    np.testing.assert_allclose(hit.matches[1].box, [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
