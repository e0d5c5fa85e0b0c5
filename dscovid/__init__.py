"""dscovid: joint 3D lesion segmentation and COVID-19 / CAP / non-pneumonia classification of chest CT.

A self-configuring reimplementation of DeepSC-COVID (Wang et al., IEEE TMI 2021).
"""

__version__ = "0.1.0"
