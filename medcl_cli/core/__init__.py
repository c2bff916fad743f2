"""The bottom layer every other package may import, and which imports no other medcl package but
itself: atomic files and temporaries (`files`), run.json (`runfolder`), DDP collectives (`collectives`),
the method protocol (`protocol`) and the progress reporter (`report`)."""
