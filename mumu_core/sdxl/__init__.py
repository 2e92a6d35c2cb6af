"""SDXL file formats: key names (`keys`), parameter shapes (`shapes`), model detection (`detect`),
and writing the original single-file layout (`single_file`)."""
