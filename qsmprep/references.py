"""The bibliography of qsmprep: every paper a method, a sidecar or the methods boilerplate cites.

Methods name their papers by key (``references=`` at registration, :mod:`qsmprep.qsm.registry`); a test
checks that every key exists here. Each entry holds the fields of a journal article (authors, title,
journal, year, volume, pages, DOI), from which both the citation text of the boilerplate and the BibTeX
entries of ``logs/CITATION.bib`` are made.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REFERENCES", "Reference", "format_reference", "bibtex_entry"]


@dataclass(frozen=True)
class Reference:
    """A journal article. ``authors`` as cited (``"Surname AB, Surname C, et al"``; a group author may come
    first, followed by ``;``)."""

    authors: str
    title: str
    journal: str
    year: int
    volume: str
    pages: str
    doi: str

    @property
    def text(self) -> str:
        """``Authors. Title. Journal. Year;volume:pages.`` (Vancouver style)."""
        end = "" if self.title.endswith(("?", "!")) else "."
        return f"{self.authors}. {self.title}{end} {self.journal}. {self.year};{self.volume}:{self.pages}."

    def bibtex_authors(self) -> str:
        """The authors in BibTeX form: ``Surname, A. B. and ... and others``; a group author in braces."""
        names = []
        group, _, people = self.authors.rpartition(";")
        if group:
            names.append("{" + group.strip() + "}")
        for part in people.split(","):
            part = part.strip()
            if not part:
                continue
            if part == "et al":
                names.append("others")
                continue
            surname, _, initials = part.rpartition(" ")
            if surname and initials.isupper() and initials.isalpha():
                names.append(f"{surname}, {' '.join(c + '.' for c in initials)}")
            else:
                names.append("{" + part + "}")
        return " and ".join(names)


#: key -> the article
REFERENCES: dict[str, Reference] = {
    "avants2008": Reference(
        'Avants BB, Epstein CL, Grossman M, Gee JC',
        'Symmetric diffeomorphic image registration with cross-correlation: evaluating automated labeling of elderly and neurodegenerative brain',
        'Med Image Anal', 2008, '12', '26-41', '10.1016/j.media.2007.06.004',
    ),
    "ciric2022": Reference(
        'Ciric R, Thompson WH, Lorenz R, et al',
        'TemplateFlow: FAIR-sharing of multi-scale, multi-species brain models',
        'Nat Methods', 2022, '19', '1568-1571', '10.1038/s41592-022-01681-2',
    ),
    "dymerska2021": Reference(
        'Dymerska B, Eckstein K, Bachrata B, et al',
        'Phase unwrapping with a rapid opensource minimum spanning tree algorithm (ROMEO)',
        'Magn Reson Med', 2021, '85', '2294-2308', '10.1002/mrm.28563',
    ),
    "eckstein2018": Reference(
        'Eckstein K, Dymerska B, Bachrata B, et al',
        'Computationally efficient combination of multi-channel phase data from multi-echo acquisitions (ASPIRE)',
        'Magn Reson Med', 2018, '79', '2996-3006', '10.1002/mrm.26963',
    ),
    "smith2002": Reference(
        'Smith SM',
        'Fast robust automated brain extraction',
        'Hum Brain Mapp', 2002, '17', '143-155', '10.1002/hbm.10062',
    ),
    "stewart2022": Reference(
        "Stewart AW, Robinson SD, O'Brien K, et al",
        'QSMxT: Robust masking and artifact reduction for quantitative susceptibility mapping',
        'Magn Reson Med', 2022, '87', '1289-1300', '10.1002/mrm.29048',
    ),
    "schofield2003": Reference(
        'Schofield MA, Zhu Y',
        'Fast phase unwrapping algorithm for interferometric applications',
        'Opt Lett', 2003, '28', '1194-1196', '10.1364/OL.28.001194',
    ),
    "wu2012": Reference(
        'Wu B, Li W, Guidon A, Liu C',
        'Whole brain susceptibility mapping using compressed sensing',
        'Magn Reson Med', 2012, '67', '137-147', '10.1002/mrm.23000',
    ),
    "li2011": Reference(
        'Li W, Wu B, Liu C',
        'Quantitative susceptibility mapping of human brain reflects spatial variation in tissue composition',
        'NeuroImage', 2011, '55', '1645-1656', '10.1016/j.neuroimage.2010.11.088',
    ),
    "schweser2011": Reference(
        'Schweser F, Deistung A, Lehr BW, Reichenbach JR',
        'Quantitative imaging of intrinsic magnetic tissue properties using MRI signal phase: an approach to in vivo brain iron metabolism?',
        'NeuroImage', 2011, '54', '2789-2807', '10.1016/j.neuroimage.2010.10.070',
    ),
    "liu2011": Reference(
        'Liu T, Khalidov I, de Rochefort L, et al',
        'A novel background field removal method for MRI using projection onto dipole fields (PDF)',
        'NMR Biomed', 2011, '24', '1129-1136', '10.1002/nbm.1670',
    ),
    "liu2013": Reference(
        'Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y',
        'Nonlinear formulation of the magnetic field to source relationship for robust quantitative susceptibility mapping',
        'Magn Reson Med', 2013, '69', '467-476', '10.1002/mrm.24272',
    ),
    "wen2014": Reference(
        'Wen Y, Zhou D, Liu T, Spincemaille P, Wang Y',
        'An iterative spherical mean value method for background field removal in MRI',
        'Magn Reson Med', 2014, '72', '1065-1071', '10.1002/mrm.24998',
    ),
    "zhou2014": Reference(
        'Zhou D, Liu T, Spincemaille P, Wang Y',
        'Background field removal by solving the Laplacian boundary value problem',
        'NMR Biomed', 2014, '27', '312-319', '10.1002/nbm.3064',
    ),
    "bollmann2019": Reference(
        'Bollmann S, Rasmussen KGB, Kristensen M, et al',
        'DeepQSM - using deep learning to solve the dipole inversion for quantitative susceptibility mapping',
        'NeuroImage', 2019, '195', '373-383', '10.1016/j.neuroimage.2019.03.060',
    ),
    "cognolato2023": Reference(
        "Cognolato F, O'Brien K, Jin J, et al",
        'NeXtQSM - A complete deep learning pipeline for data-consistent quantitative susceptibility mapping trained with hybrid data',
        'Med Image Anal', 2023, '84', '102700', '10.1016/j.media.2022.102700',
    ),
    "aggarwal2019": Reference(
        'Aggarwal HK, Mani MP, Jacob M',
        'MoDL: Model-based deep learning architecture for inverse problems',
        'IEEE Trans Med Imaging', 2019, '38', '394-405', '10.1109/TMI.2018.2865356',
    ),
    "jung2020": Reference(
        'Jung W, Yoon J, Ji S, et al',
        'Exploring linearity of deep neural network trained QSM: QSMnet+',
        'NeuroImage', 2020, '211', '116619', '10.1016/j.neuroimage.2020.116619',
    ),
    "kames2018": Reference(
        'Kames C, Wiggermann V, Rauscher A',
        'Rapid two-step dipole inversion for susceptibility mapping with sparsity priors',
        'NeuroImage', 2018, '167', '276-283', '10.1016/j.neuroimage.2017.11.018',
    ),
    "liu2012medi": Reference(
        'Liu T, Xu W, Spincemaille P, Avestimehr AS, Wang Y',
        'Accuracy of the morphology enabled dipole inversion (MEDI) algorithm for quantitative susceptibility mapping in MRI',
        'IEEE Trans Med Imaging', 2012, '31', '816-824', '10.1109/TMI.2011.2182523',
    ),
    "bilgic2014tv": Reference(
        'Bilgic B, Fan AP, Polimeni JR, et al',
        'Fast quantitative susceptibility mapping with L1-regularization and automatic parameter selection',
        'Magn Reson Med', 2014, '72', '1444-1459', '10.1002/mrm.25029',
    ),
    "bilgic2014l2": Reference(
        'Bilgic B, Chatnuntawech I, Fan AP, et al',
        'Fast image reconstruction with L2-regularization',
        'J Magn Reson Imaging', 2014, '40', '181-191', '10.1002/jmri.24365',
    ),
    "shmueli2009": Reference(
        'Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH',
        'Magnetic susceptibility mapping of brain tissue in vivo using MRI phase data',
        'Magn Reson Med', 2009, '62', '1510-1522', '10.1002/mrm.22135',
    ),
    "wharton2010": Reference(
        'Wharton S, Schafer A, Bowtell R',
        'Susceptibility mapping in the human brain using threshold-based k-space division',
        'Magn Reson Med', 2010, '63', '1292-1304', '10.1002/mrm.22334',
    ),
    "consensus2024": Reference(
        'QSM Consensus Organization Committee; Bilgic B, Costagli M, Chan KS, et al',
        'Recommended implementation of quantitative susceptibility mapping for clinical research in the brain: a consensus of the ISMRM electro-magnetic tissue properties study group',
        'Magn Reson Med', 2024, '91', '1834-1862', '10.1002/mrm.30006',
    ),
    "liu2018csf": Reference(
        'Liu Z, Spincemaille P, Yao Y, Zhang Y, Wang Y',
        'MEDI+0: Morphology enabled dipole inversion with automatic uniform cerebrospinal fluid zero reference for quantitative susceptibility mapping',
        'Magn Reson Med', 2018, '79', '2795-2803', '10.1002/mrm.26946',
    ),
    "eckstein2021": Reference(
        'Eckstein K, Bachrata B, Hangel G, et al',
        'Improved susceptibility weighted imaging at ultra-high field using bipolar multi-echo acquisition and optimized image processing: CLEAR-SWI',
        'NeuroImage', 2021, '237', '118175', '10.1016/j.neuroimage.2021.118175',
    ),
    "haacke2004": Reference(
        'Haacke EM, Xu Y, Cheng YCN, Reichenbach JR',
        'Susceptibility weighted imaging (SWI)',
        'Magn Reson Med', 2004, '52', '612-618', '10.1002/mrm.20198',
    ),
    "pei2015": Reference(
        'Pei M, Nguyen TD, Thimmappa ND, et al',
        'Algorithm for fast monoexponential fitting based on Auto-Regression on Linear Operations (ARLO) of data',
        'Magn Reson Med', 2015, '73', '843-850', '10.1002/mrm.25137',
    ),
    "gorgolewski2011": Reference(
        'Gorgolewski K, Burns CD, Madison C, et al',
        'Nipype: a flexible, lightweight and extensible neuroimaging data processing framework in Python',
        'Front Neuroinform', 2011, '5', '13', '10.3389/fninf.2011.00013',
    ),
}


def format_reference(key: str) -> str:
    """``"<citation> doi:<doi>"`` of a reference key."""
    ref = REFERENCES[key]
    return f"{ref.text} doi:{ref.doi}"


def _bib(value: str) -> str:
    return value.replace("&", r"\&").replace("%", r"\%")


def bibtex_entry(key: str) -> str:
    """The ``@article`` BibTeX entry of a reference key: author, title, journal, year, volume, pages, doi."""
    ref = REFERENCES[key]
    fields = [
        ("author", ref.bibtex_authors()),
        ("title", "{" + _bib(ref.title) + "}"),
        ("journal", _bib(ref.journal)),
        ("year", str(ref.year)),
        ("volume", ref.volume),
        ("pages", ref.pages.replace("-", "--")),
        ("doi", ref.doi),
    ]
    return f"@article{{{key},\n" + ",\n".join(f"  {k} = {{{v}}}" for k, v in fields) + "\n}\n"
