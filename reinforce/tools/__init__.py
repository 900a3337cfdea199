"""Store tools: ``reinforce inspect`` (:mod:`.inspect`), ``reinforce verify`` (:mod:`.verify`) and the replay
contact sheet (:mod:`.grid`)."""
