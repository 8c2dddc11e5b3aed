"""Vision-language models: one package for both VLM families.

- ``model``: the plain VLM (family ``vlm``, task ``instruct``): loading a local folder (transformers' native VLMs,
  remote code only with ``model.trust_remote_code``), the chat codec (assistant-only labels through the model's own
  template), LoRA placement on the language model, generation.
- ``logits``: token logits only at the positions a loss or a sample reads (``logits_to_keep``), and the LM loss.
- ``processing``: processors (loading, saving, image-only stand-ins) and chat templates.
- ``seg``: the segmenting VLM (family ``segvlm``, Sa2VA / LISA style) = the plain VLM above (loaded, processed,
  chat-encoded and LoRA-placed by ``model``) + a mask head (projection of the ``[SEG]`` hidden state + SAM / SAM 2
  prompt encoder and mask decoder); ``seg/`` holds only the mask head, SAM loading and the composed folder.
- ``tiny``: offline tiny VLMs built from transformers config classes (tests, demos), for both families.
- ``sa2va_import``: maps a published Sa2VA checkpoint onto the composed segmenting-VLM folder.

Nothing is imported here: the families are built through ``medtune.models.registry``.
"""
