"""Planting one error of a given rule in a synthetic COCO instances document — shared by the tests of
``tao dataset validate`` and of the loaders' agreement with it, so both plant exactly the same record."""
from __future__ import annotations

# rules whose planted error is seen only when the image files are checked (``--images``)
IMAGE_FILE_RULES = ("image_missing", "image_size_mismatch", "image_decode")


def plant_coco(doc: dict, rule: str) -> str:
    """Plant one error of kind ``rule`` in ``doc`` (a synthetic COCO document whose second annotation has an
    RLE segmentation) and return the record label it must be reported at (``annotation id 3``, ``image id 2``)."""
    imgs, anns = doc["images"], doc["annotations"]
    a = anns[1]
    img = next(i for i in imgs if i["id"] == a["image_id"])
    ann_label = f"annotation id {a['id']}"
    if rule == "image_id_duplicate":
        imgs[2]["id"] = imgs[0]["id"]
        return f"image id {imgs[0]['id']}"
    if rule == "annotation_id_duplicate":
        a["id"] = anns[0]["id"]
        return f"annotation id {anns[0]['id']}"
    if rule == "annotation_id_missing":
        del a["id"]
        return "annotations[1]"
    if rule == "image_size":
        imgs[1]["height"] = 0
        return f"image id {imgs[1]['id']}"
    if rule in IMAGE_FILE_RULES:
        if rule == "image_missing":
            imgs[3]["file_name"] = "no_such_image.jpg"
        elif rule == "image_size_mismatch":
            imgs[3]["width"] += 7
        else:
            imgs[3]["file_name"] = "broken.jpg"  # the test writes a broken.jpg beside the images
        return f"image id {imgs[3]['id']}"
    edits = {
        "image_ref": ("image_id", 987654),
        "category_ref": ("category_id", 4321),
        "bbox_not_finite": ("bbox", [1.0, float("nan"), 3.0, 4.0]),
        "bbox_negative": ("bbox", [1.0, 2.0, -3.0, 4.0]),
        "bbox_outside_image": ("bbox", [img["width"] - 2.0, 0.0, 10.0, 5.0]),
        "polygon_short": ("segmentation", [[1.0, 1.0, 5.0, 5.0]]),
        "polygon_values": ("segmentation", [[1.0, 1.0, 5.0, "x", 5.0, 9.0]]),
        "rle": ("segmentation", {"size": [img["height"] + 1, img["width"]], "counts": a["segmentation"]["counts"]}),
        "segmentation_type": ("segmentation", "a mask"),
        "iscrowd": ("iscrowd", 2),
    }
    key, value = edits[rule]
    a[key] = value
    return ann_label
