"""The main job: model -> exported graphs -> encoder service -> index of real photos -> queries."""
