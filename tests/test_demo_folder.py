"""`python -m tadisr_core.demo` on a user's folder: what the walk leaves out is said once, and the
--recursive it advises exists."""

from __future__ import annotations

from PIL import Image

from tadisr_core.demo import main as demo_main


def test_the_demo_on_a_folder_says_what_it_left_out_once_and_takes_sub_folders(tmp_path, capsys):
    """Defects: every warning of the folder walk came twice (the strips walked the folder again), and the one
    about sub-folders advised --recursive, which the demo refused as an unknown argument."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for path in (tree / "a.png", tree / "sub" / "b.png"):
        Image.new("RGB", (24, 16), (200, 40, 40)).save(path)
    (tree / "notes.txt").write_text("not an image")
    assert demo_main([str(tree), "-o", str(tmp_path / "flat")]) == 0
    said = capsys.readouterr().err
    assert said.count("left out 1 file(s) that are not images we read (notes.txt)") == 1
    assert said.count("1 sub-folder(s) not searched; add --recursive") == 1
    assert sorted(p.name for p in (tmp_path / "flat").rglob("*_strip.png")) == ["a_strip.png"]
    assert demo_main([str(tree), "-o", str(tmp_path / "deep"), "--recursive"]) == 0
    assert sorted(p.relative_to(tmp_path / "deep").as_posix() for p in (tmp_path / "deep").rglob("*_strip.png")) == [
        "a_strip.png", "sub/b_strip.png"]
