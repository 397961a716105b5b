"""The bottom layer every other package may use: processes and ranks (:mod:`.distributed`), atomic
writes (:mod:`.atomic`) and safe reading of untrusted files (:mod:`.safeio`). It imports nothing
else of featdenoise."""
